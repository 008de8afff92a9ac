"""What the cloud route backends (aws-vpc, gce) share."""

/* flannel udp delivery: tc egress (clsact, direct-action) on the container bridge (docker0/cni0).
 *
 *   in:   [Ethernet 14][inner IPv4 ...]   routed by the host to the bridge, after FORWARD/POSTROUTING
 *   out:  the same frame, bpf_redirect()ed to the bridge port (the container's host-side veth)
 *
 * Why: a decapsulated skb keeps the sender's tunnel GSO state (skb->encapsulation, SKB_GSO_UDP_TUNNEL:
 * no BPF helper of kernels before the DECAP_L4_UDP flag can clear it). A bridge before 6.19 offers no
 * encapsulated-GSO features, so the bridge's transmit would cut each 64 KB skb into MTU-size segments
 * with software checksums; a veth offers them all, so handed to the port the skb stays whole. The host
 * has already routed the packet, run netfilter (FORWARD, POSTROUTING) and resolved the destination's
 * MAC: this program only skips the bridge's own forwarding step, and only for packets that arrived on
 * the underlay (skb->ingress_ifindex) and whose destination MAC is the one the agent knows for it.
 * The agent attaches it only on kernels that need it. Anything else goes on to the bridge untouched.
 */
#include "lib/flannel.h"

FL_PROG("tc")
int flannel_br_out(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct fl_config *cfg = fl_get_config();
	struct fl_endpoint *ep;

	if (!cfg || skb->ingress_ifindex != cfg->underlay_ifindex) {
		fl_count(FL_DELIVER_PASS_OTHER, skb->len);
		return TC_ACT_UNSPEC; /* not ours: other filters and the bridge still see it */
	}
	struct ethhdr *eth = data;
	struct iphdr *ip = data + FL_ETH_HLEN;
	/* The routed skb's head holds the Ethernet and IPv4 headers (the stack built the first, the
	 * forwarding path read the second): nothing to pull. */
	if ((void *)(ip + 1) > data_end || eth->h_proto != fl_htons(FL_ETH_P_IP)) {
		fl_count(FL_DELIVER_PASS_OTHER, skb->len);
		return TC_ACT_UNSPEC;
	}
	ep = fl_lookup_endpoint(ip->daddr);
	if (!ep) {
		fl_count(FL_DELIVER_NO_ENDPOINT, skb->len);
		return TC_ACT_UNSPEC;
	}
	/* The host's neighbour entry chose eth->h_dest; if our map disagrees (a container replaced while
	 * the agent was away), the bridge's own FDB decides. Three 16-bit compares: h_dest is 2-aligned. */
	const __u16 *want = (const __u16 *)ep->mac, *got = (const __u16 *)eth->h_dest;
	if (want[0] != got[0] || want[1] != got[1] || want[2] != got[2]) {
		fl_count(FL_DELIVER_MAC_MISMATCH, skb->len);
		return TC_ACT_UNSPEC;
	}
	fl_count(FL_DELIVER_PORT, skb->len);
	return bpf_redirect(ep->port_ifindex, 0); /* the port's transmit: the veth into the container */
}

FL_LICENSE

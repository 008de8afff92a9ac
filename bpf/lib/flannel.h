/* flannel's udp wire format, the maps the agent shares with the programs, and small helpers.
 *
 * Wire format (flanneld's udp backend): [outer IPv4 20][UDP 8][inner IPv4 packet], UDP port 8285 by
 * default (Backend.Port). Nothing else: no flannel header, so the overhead is exactly 28 bytes.
 *
 * Every struct and reason number here is mirrored by flannel_ebpf/datapath/layout.py; a test checks
 * that both agree. Keep the two in step.
 */
#ifndef FLANNEL_FLANNEL_H
#define FLANNEL_FLANNEL_H

#include "compat.h"

#define FL_ETH_HLEN 14                       /* Ethernet header: dst MAC 6, src MAC 6, type 2 */
#define FL_IP_HLEN 20                        /* IPv4 header without options (ihl == 5) */
#define FL_UDP_HLEN 8
#define FL_ENCAP_LEN (FL_IP_HLEN + FL_UDP_HLEN) /* 28: flannel's udp overhead */
#define FL_ETH_P_IP 0x0800

/* IPv4 frag_off field (host order after ntohs): MF flag and the 13-bit fragment offset. */
#define FL_IP_MF 0x2000
#define FL_IP_DF 0x4000
#define FL_IP_OFFSET 0x1fff

/* --- maps --------------------------------------------------------------------------------- */

/* fl_config[0]: filled by the agent (start). Addresses in network order. */
struct fl_config {
	__be32 own_ip;           /* outer source of what we send; outer destination we accept */
	__be32 tun_addr;         /* flannel0's address: the source of our ICMP errors */
	__be32 local_subnet;     /* this host's lease (network address) */
	__be32 local_mask;       /* its netmask */
	__be32 network;          /* the whole overlay (config's Network): what the underlay's */
	__be32 network_mask;     /* egress encapsulates, if a peer leases it */
	__u32 underlay_ifindex;  /* where encapsulated packets leave */
	__u32 underlay_mtu;      /* shown by `status`; frag-needed uses bpf_check_mtu's answer */
	__be16 port;             /* UDP destination port (8285), network order */
	__u16 flags;             /* FL_CFG_* below */
	__u32 reserved;
};
#define FL_CFG_READY 1           /* the agent has filled the slot */
#define FL_CFG_DECAP_L4_UDP 2    /* the kernel knows BPF_F_ADJ_ROOM_DECAP_L4_UDP (probed once at load) */
#define FL_CFG_DELIVER_PEER 4    /* tc decap hands packets for known endpoints straight into the
				  * container (bpf_redirect_peer): host netfilter is bypassed (opt-in) */
#define FL_CFG_ALLOW_FOREIGN_SOURCE 8 /* decap accepts any inner source from a member, as flanneld does
				       * (--udp-allow-foreign-source); by default the inner source must
				       * lie in a subnet the sending PublicIP leases */

/* fl_peers: longest-prefix match from an inner destination to the peer that leases it. */
struct fl_peer_key {
	__u32 prefixlen;         /* LPM trie keys start with the prefix length, in bits */
	__be32 addr;             /* the peer's subnet, network order */
};
struct fl_peer {
	__be32 public_ip;        /* the peer host's PublicIP: outer destination */
};

/* fl_members: PublicIP (network order) -> number of leases it holds. Decap accepts only these. */

/* fl_endpoints: a local container's IPv4 address (network order) -> where it sits on the container
 * bridge (docker0/cni0). Kept by the agent from the bridge's neighbour and FDB tables. */
struct fl_endpoint {
	__u32 port_ifindex;      /* the bridge port: the container's host-side veth */
	__u8 mac[6];             /* the container's MAC (what the host's neighbour entry resolves to) */
	__u8 bridge_mac[6];      /* the bridge's own MAC: the source of frames the host routes to it */
};

/* fl_counters: per-CPU packets/bytes for every pass/drop reason. */
struct fl_counter {
	__u64 packets;
	__u64 bytes;
};

enum fl_reason {
	/* tc egress on flannel0 (encapsulation) */
	FL_ENCAP_OK = 0,             /* encapsulated: redirected to the underlay, or on its egress already */
	FL_ENCAP_NOT_IPV4 = 1,       /* not IPv4 (e.g. IPv6 router solicitations): dropped */
	FL_ENCAP_MALFORMED = 2,      /* truncated or bad IPv4 header: dropped */
	FL_ENCAP_NO_PEER_ICMP = 3,   /* no peer leases the destination: ICMP net unreachable sent */
	FL_ENCAP_NO_PEER_DROP = 4,   /* no peer, and no ICMP allowed (ICMP error, fragment, options) */
	FL_ENCAP_TTL_EXPIRED = 5,    /* inner TTL would reach 0 (flannel drops silently too) */
	FL_ENCAP_TOO_BIG_ICMP = 6,   /* non-GSO packet larger than the underlay allows: frag-needed sent */
	FL_ENCAP_TOO_BIG_DROP = 7,   /* too big and no ICMP possible (DF clear, or ICMP not allowed) */
	FL_ENCAP_NO_CONFIG = 8,      /* the agent has not filled fl_config yet */
	FL_ENCAP_ERROR = 9,          /* a helper failed (no room, ...) */
	FL_ENCAP_ICMP_BAD_SOURCE = 10, /* an ICMP error was due (no peer, too big) but the packet's source
					* is no unicast host (0/8, 127/8, 224/4, 240/4): none sent, dropped */
	FL_ENCAP_ICMP_RATE_LIMITED = 11, /* an ICMP error was due but this CPU's token bucket was empty
					  * (1000/s, burst 50, as icmp_msgs_per_sec/_burst): dropped */
	/* tc egress on the underlay (the peers routed straight to it; encapsulated: FL_ENCAP_OK) */
	FL_UL_PASS_NO_PEER = 12,     /* a destination in the Network that no peer leases: untouched */
	FL_UL_PASS_OTHER = 13,       /* not for the overlay (the host's own traffic): untouched */
	/* XDP or tc ingress on the underlay (decapsulation) */
	FL_DECAP_OK = 16,            /* decapsulated, handed to the stack */
	FL_DECAP_PASS_OTHER = 17,    /* not overlay traffic: untouched */
	FL_DECAP_FRAGMENT = 18,      /* an outer UDP fragment from a member to us: left untouched to the
				      * kernel's reassembly (decap never sees a whole datagram: see decap.h) */
	FL_DECAP_IP_OPTIONS = 19,    /* outer IPv4 options on a packet to our port: dropped */
	FL_DECAP_NOT_MEMBER = 20,    /* outer source holds no lease: dropped */
	FL_DECAP_NOT_LOCAL = 21,     /* inner destination outside our subnet: dropped */
	FL_DECAP_MALFORMED = 22,     /* bad outer checksum/lengths or bad inner header: dropped */
	FL_DECAP_TTL_EXPIRED = 23,   /* inner TTL would reach 0: dropped */
	FL_DECAP_NO_CONFIG = 24,     /* the agent has not filled fl_config yet: passed untouched */
	FL_DECAP_ERROR = 25,         /* a helper failed: dropped */
	FL_DECAP_FOREIGN_SOURCE = 26, /* inner source outside every subnet the outer source leases: dropped
				       * (unless FL_CFG_ALLOW_FOREIGN_SOURCE) */
	/* delivery into local containers (tc egress on the container bridge; tc decap in peer mode) */
	FL_DELIVER_PORT = 32,        /* routed, FORWARD passed: handed whole to the container's bridge port */
	FL_DELIVER_PEER = 33,        /* decapsulated straight into the container (netfilter bypassed) */
	FL_DELIVER_NO_ENDPOINT = 34, /* destination not (yet) in fl_endpoints: left to the bridge/stack */
	FL_DELIVER_MAC_MISMATCH = 35,/* the host resolved another MAC than fl_endpoints has: left to the bridge */
	FL_DELIVER_PASS_OTHER = 36,  /* not decapsulated overlay traffic: left to the bridge */
	FL_REASON_MAX = 48,
};

#define FL_PEERS_MAX 65536   /* a /8 Network cut into /24 subnets */
#define FL_MEMBERS_MAX 65536
#define FL_ENDPOINTS_MAX 65536 /* every address of a /16 subnet */

FL_MAP("array", BPF_MAP_TYPE_ARRAY, fl_config, __u32, struct fl_config, 1, 0);
FL_MAP("lpm_trie", BPF_MAP_TYPE_LPM_TRIE, fl_peers, struct fl_peer_key, struct fl_peer, FL_PEERS_MAX,
       BPF_F_NO_PREALLOC);
FL_MAP("hash", BPF_MAP_TYPE_HASH, fl_members, __be32, __u32, FL_MEMBERS_MAX, BPF_F_NO_PREALLOC);
FL_MAP("hash", BPF_MAP_TYPE_HASH, fl_endpoints, __be32, struct fl_endpoint, FL_ENDPOINTS_MAX,
       BPF_F_NO_PREALLOC);
FL_MAP("percpu_array", BPF_MAP_TYPE_PERCPU_ARRAY, fl_counters, __u32, struct fl_counter, FL_REASON_MAX,
       0);

/* fl_icmp_bucket[0]: the encap program's ICMP error token bucket, one per CPU (no atomics). Credit is
 * kept in nanoseconds of elapsed time: one message costs FL_ICMP_COST_NS, the bucket holds at most
 * FL_ICMP_BURST messages. A zeroed slot (first use) starts full. */
struct fl_icmp_bucket {
	__u64 stamp_ns;   /* bpf_ktime_get_ns() at the last refill */
	__u64 credit_ns;  /* <= FL_ICMP_BURST * FL_ICMP_COST_NS */
};
FL_MAP("percpu_array", BPF_MAP_TYPE_PERCPU_ARRAY, fl_icmp_bucket, __u32, struct fl_icmp_bucket, 1, 0);

/* Map accessors: one spelling for both loaders (bcc cannot rewrite map calls inside macros). */
static __always_inline struct fl_config *fl_get_config(void)
{
	__u32 zero = 0;
	struct fl_config *cfg;
#ifdef FLANNEL_BCC
	cfg = fl_config.lookup(&zero);
#else
	cfg = bpf_map_lookup_elem(&fl_config, &zero);
#endif
	if (cfg && !(cfg->flags & FL_CFG_READY))
		return 0;
	return cfg;
}

static __always_inline struct fl_peer *fl_lookup_peer(__be32 inner_daddr)
{
	struct fl_peer_key key = {.prefixlen = 32, .addr = inner_daddr};
#ifdef FLANNEL_BCC
	return fl_peers.lookup(&key);
#else
	return bpf_map_lookup_elem(&fl_peers, &key);
#endif
}

static __always_inline int fl_is_member(__be32 public_ip)
{
#ifdef FLANNEL_BCC
	return fl_members.lookup(&public_ip) != 0;
#else
	return bpf_map_lookup_elem(&fl_members, &public_ip) != 0;
#endif
}

static __always_inline struct fl_icmp_bucket *fl_get_icmp_bucket(void)
{
	__u32 zero = 0;
#ifdef FLANNEL_BCC
	return fl_icmp_bucket.lookup(&zero);
#else
	return bpf_map_lookup_elem(&fl_icmp_bucket, &zero);
#endif
}

static __always_inline struct fl_endpoint *fl_lookup_endpoint(__be32 addr)
{
#ifdef FLANNEL_BCC
	return fl_endpoints.lookup(&addr);
#else
	return bpf_map_lookup_elem(&fl_endpoints, &addr);
#endif
}

/* Count one packet of `bytes` under `reason`. Per-CPU slots: no atomics needed. */
static __always_inline void fl_count(__u32 reason, __u32 bytes)
{
	struct fl_counter *c;
#ifdef FLANNEL_BCC
	c = fl_counters.lookup(&reason);
#else
	c = bpf_map_lookup_elem(&fl_counters, &reason);
#endif
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

/* --- checksums ---------------------------------------------------------------------------- */

static __always_inline __u16 fl_csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* The checksum of a 20-byte IPv4 header (check field included as it stands: set it to 0 first to
 * compute, or leave it to verify: a valid header folds to 0). Ten 16-bit words, unrolled. */
static __always_inline __u16 fl_ipv4_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u64 sum = 0;
#pragma unroll
	for (int i = 0; i < FL_IP_HLEN / 2; i++)
		sum += w[i];
	return fl_csum_fold(sum);
}

/* Decrement the TTL and patch the header checksum incrementally (RFC 1624): the TTL is the high
 * byte of the 16-bit word it shares with the protocol, so the word drops by 0x0100 and the
 * one's-complement checksum rises by the same amount, with end-around carry. Because the header's
 * one's-complement sum is unchanged, a CHECKSUM_COMPLETE skb stays valid too. */
static __always_inline void fl_decrement_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;
	check += fl_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xffff));
	ip->ttl--;
}

/* Is this IPv4 packet a non-first fragment (offset != 0)? Only the first carries the L4 header. */
static __always_inline int fl_is_later_fragment(const struct iphdr *ip)
{
	return (fl_ntohs(ip->frag_off) & FL_IP_OFFSET) != 0;
}

static __always_inline int fl_is_fragment(const struct iphdr *ip)
{
	return (fl_ntohs(ip->frag_off) & (FL_IP_MF | FL_IP_OFFSET)) != 0;
}

#endif /* FLANNEL_FLANNEL_H */

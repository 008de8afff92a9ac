/* flannel udp encapsulation: tc egress (clsact, direct-action) on flannel0.
 *
 * flannel0 is a TUN device that nobody reads: the route `<Network> dev flannel0` steers overlay
 * traffic to it, and this program takes every packet before the (reader-less) queue would drop it.
 * A TUN is an L3 device, so the skb starts at the inner IPv4 header:
 *
 *   in:   [inner IPv4 ...]
 *   out:  [Ethernet 14][outer IPv4 20][UDP 8][inner IPv4 ...]   -> bpf_redirect_neigh(underlay)
 *
 * The Ethernet header is only a placeholder: redirect_neigh strips it and resolves the next hop
 * (the peer itself, or a router in front of it) through the FIB and the neighbour table.
 *
 * No peer for the destination -> the packet is rewritten into ICMP net unreachable and injected back
 * on flannel0's ingress (what flanneld's proxy answers). A non-GSO packet that would not fit the
 * underlay after encapsulation -> ICMP fragmentation needed, as the kernel would answer.
 */
#include "lib/flannel.h"
#include "lib/encap.h"
#include "lib/icmp_reply.h"

/* Out of the underlay towards the peer. bpf_redirect_neigh() without a next hop routes every skb
 * again (ip_route_output_flow: a route lookup and a dst per skb); given the next hop it only hands the
 * skb to that neighbour. bpf_fib_lookup() finds the next hop for less: the lookup the helper would make
 * (output on the underlay, the outer addresses, UDP, TOS).
 *
 * Only while the neighbour is valid (REACHABLE, STALE, DELAY, PROBE: the lookup says NO_NEIGH
 * otherwise): then neigh_output() sends at once and keeps the neighbour's state machine going. An
 * unresolved neighbour queues the skb, and the queue re-sends it through the neighbour of the skb's
 * dst, which here is still flannel0's route (a device without ARP), so it would leave without its
 * Ethernet header: measured, one ping lost per resolution. The helper's own lookup sets the dst to
 * the underlay's route. It also takes whatever is not a plain unicast route on the underlay (no
 * route, a gateway of another family, forwarding off) and a marked skb (the FIB lookup here would
 * ignore its mark). */
static __always_inline long fl_redirect_to_peer(struct __sk_buff *skb, const struct fl_outer *o, __u32 underlay)
{
	if (skb->mark == 0) {
		struct bpf_fib_lookup fib = {
			.family = FL_AF_INET,
			.l4_protocol = IPPROTO_UDP,
			.ifindex = underlay,
			.tos = o->tos,
			.ipv4_src = o->saddr,
			.ipv4_dst = o->daddr,
		};
		long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
		if (rc == BPF_FIB_LKUP_RET_SUCCESS && fib.family == FL_AF_INET && fib.ifindex == underlay) {
			struct bpf_redir_neigh nh = {.nh_family = FL_AF_INET, .ipv4_nh = fib.ipv4_dst};
			return fl_redirect_neigh(underlay, &nh, sizeof(nh), 0);
		}
	}
	return fl_redirect_neigh(underlay, 0, 0, 0);
}

FL_PROG("tc")
int flannel_encap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 pkt_len = skb->len;
	struct fl_config *cfg;
	struct fl_peer *peer;
	struct iphdr *ip;

	if (skb->protocol != fl_htons(FL_ETH_P_IP)) {
		fl_count(FL_ENCAP_NOT_IPV4, pkt_len);
		return TC_ACT_SHOT;
	}
	cfg = fl_get_config();
	if (!cfg) {
		fl_count(FL_ENCAP_NO_CONFIG, pkt_len);
		return TC_ACT_SHOT;
	}
	/* The inner IPv4 header must be in the linear area to be read directly. */
	if (data + FL_IP_HLEN > data_end) {
		if (bpf_skb_pull_data(skb, FL_IP_HLEN) < 0) {
			fl_count(FL_ENCAP_MALFORMED, pkt_len);
			return TC_ACT_SHOT;
		}
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + FL_IP_HLEN > data_end) {
			fl_count(FL_ENCAP_MALFORMED, pkt_len);
			return TC_ACT_SHOT;
		}
	}
	__u32 inner_len;
	ip = fl_inner_datagram(skb, 0, &inner_len);
	if (!ip) {
		fl_count(FL_ENCAP_MALFORMED, pkt_len);
		return TC_ACT_SHOT;
	}

	peer = fl_lookup_peer(ip->daddr);
	if (!peer) {
		__u32 why = fl_icmp_check(skb, FL_ENCAP_NO_PEER_DROP);
		if (why == 0) {
			if (fl_icmp_reply(skb, cfg->tun_addr, FL_ICMP_NET_UNREACH, 0) == 0) {
				fl_count(FL_ENCAP_NO_PEER_ICMP, pkt_len);
				return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
			}
			why = FL_ENCAP_NO_PEER_DROP;
		}
		fl_count(why, pkt_len);
		return TC_ACT_SHOT;
	}
	__u32 why = fl_carry_problem(ip, inner_len);
	if (why) {
		fl_count(why, pkt_len);
		return TC_ACT_SHOT;
	}

	/* A GSO packet is cut into underlay-sized segments later (the route MTU on flannel0 is already
	 * 28 below the underlay's); a single packet must fit as it is. bpf_check_mtu with *mtu_len set
	 * compares that L3 length plus len_diff against the device MTU and returns the MTU. */
	if (skb->gso_size == 0) {
		__u32 mtu = inner_len;
		if (bpf_check_mtu(skb, cfg->underlay_ifindex, &mtu, FL_ENCAP_LEN, 0) != 0) {
			int dont_fragment = (fl_ntohs(ip->frag_off) & FL_IP_DF) != 0;
			why = FL_ENCAP_TOO_BIG_DROP;
			if (dont_fragment && mtu > FL_ENCAP_LEN)
				why = fl_icmp_check(skb, FL_ENCAP_TOO_BIG_DROP);
			if (why == 0) {
				if (fl_icmp_reply(skb, cfg->tun_addr, FL_ICMP_FRAG_NEEDED, mtu - FL_ENCAP_LEN) == 0) {
					fl_count(FL_ENCAP_TOO_BIG_ICMP, pkt_len);
					return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
				}
				why = FL_ENCAP_TOO_BIG_DROP;
			}
			fl_count(why, pkt_len);
			return TC_ACT_SHOT;
		}
	}

	/* Everything the outer headers need, read before helpers invalidate packet pointers. */
	struct fl_outer o = {
		.saddr = cfg->own_ip, .daddr = peer->public_ip, .port = cfg->port, .tos = ip->tos, .inner_len = inner_len,
	};
	__u32 underlay_ifindex = cfg->underlay_ifindex;

	/* Like flanneld's proxy: the inner TTL drops by one on the way out. */
	fl_decrement_ttl(ip);
	o.hash = bpf_get_hash_recalc(skb); /* the outer source port: see fl_push_outer */

	/* Room for an Ethernet header in front of the L3 packet: redirect_neigh needs a MAC header. */
	if (bpf_skb_change_head(skb, FL_ETH_HLEN, 0) < 0 ||
	    fl_push_outer(skb, &o) < 0) {
		fl_count(FL_ENCAP_ERROR, pkt_len);
		return TC_ACT_SHOT;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data; /* offset 0; fl_push_outer checked that the headers are in the head */
	if ((void *)(eth + 1) > data_end) {
		fl_count(FL_ENCAP_ERROR, pkt_len);
		return TC_ACT_SHOT;
	}
	/* Placeholder MACs (zero is not multicast, which redirect_neigh would refuse); it rewrites them. */
	__builtin_memset(eth->h_dest, 0, ETH_ALEN);
	__builtin_memset(eth->h_source, 0, ETH_ALEN);
	eth->h_proto = fl_htons(FL_ETH_P_IP);

	fl_count(FL_ENCAP_OK, pkt_len);
	return fl_redirect_to_peer(skb, &o, underlay_ifindex);
}

FL_LICENSE

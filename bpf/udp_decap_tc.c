/* flannel udp decapsulation: tc ingress (clsact, direct-action) on the underlay NIC.
 *
 *   in:   [Ethernet 14][outer IPv4 20][UDP 8][inner IPv4 ...]
 *   out:  [Ethernet 14][inner IPv4 ...]      -> TC_ACT_OK: the stack routes it (FORWARD chain and all)
 *                                            -> or, in peer mode, bpf_redirect_peer() into the container
 *
 * The alternative to XDP: it works on any device without driver support, sees GRO'd skbs, and
 * measured faster than XDP_PASS on veth underlays. Traffic that is not the overlay's goes on to the
 * next tc filter untouched (TC_ACT_UNSPEC).
 */
#include "lib/flannel.h"
#include "lib/decap.h"

/* Peer mode (opt-in): straight into the container's namespace, as Cilium delivers to pods. The
 * host's routing, netfilter (FORWARD, POSTROUTING, conntrack) and the bridge are all skipped, so this
 * writes what the host's forwarding would have: the Ethernet header of the bridge's frame to the
 * container (the inner TTL was already decremented by fl_decap_check). Unknown destinations (the host
 * has not resolved the container yet) take the normal path. */
static __always_inline int fl_deliver_peer(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + FL_ETH_HLEN;
	struct fl_endpoint *ep;

	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	ep = fl_lookup_endpoint(ip->daddr);
	if (!ep) {
		fl_count(FL_DELIVER_NO_ENDPOINT, skb->len);
		return TC_ACT_OK;
	}
	__builtin_memcpy(eth->h_dest, ep->mac, 6);
	__builtin_memcpy(eth->h_source, ep->bridge_mac, 6);
	/* The frame was addressed to the underlay NIC's MAC (PACKET_HOST): it stays so for the container,
	 * whose MAC it now carries (kernels before 6.15 needed bpf_skb_change_type for this). */
	fl_count(FL_DELIVER_PEER, skb->len);
	return bpf_redirect_peer(ep->port_ifindex, 0);
}

FL_PROG("tc")
int flannel_tc_in(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 pkt_len = skb->len;
	struct fl_config *cfg = fl_get_config();

	if (!cfg) {
		fl_count(FL_DECAP_NO_CONFIG, pkt_len);
		return TC_ACT_UNSPEC;
	}
	/* Headers of an skb may sit partly in paged fragments: make the first 62 bytes linear. */
	if (data + FL_DECAP_HEADROOM > data_end && pkt_len >= FL_DECAP_HEADROOM) {
		if (bpf_skb_pull_data(skb, FL_DECAP_HEADROOM) < 0) {
			fl_count(FL_DECAP_ERROR, pkt_len);
			return TC_ACT_UNSPEC; /* cannot look: leave it to the next filter and the stack */
		}
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	__u32 verdict = fl_decap_check(data, data_end, pkt_len, cfg);
	if (verdict == FL_DECAP_PASS_OTHER || verdict == FL_DECAP_FRAGMENT) { /* untouched (decap.h) */
		fl_count(verdict, pkt_len);
		return TC_ACT_UNSPEC;
	}
	if (verdict != FL_DECAP_OK) {
		fl_count(verdict, pkt_len);
		return TC_ACT_SHOT;
	}
	/* Remove the 28 bytes after the MAC header (outer IPv4 + UDP); FIXED_GSO leaves gso_size.
	 *
	 * A GSO skb that crossed a veth underlay still carries the sender's tunnel offload state
	 * (skb->encapsulation, SKB_GSO_UDP_TUNNEL, set by our encap's ENCAP flags). Kernels with
	 * BPF_F_ADJ_ROOM_DECAP_L4_UDP reset it the way a kernel tunnel does (iptunnel_pull_offloads); the
	 * agent probes for the flag once at load (FL_CFG_DECAP_L4_UDP). Without it (6.18 and older) the
	 * state stays, and the bridge hand-off (udp_deliver_tc.c) keeps such skbs whole. */
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO;
	if (cfg->flags & FL_CFG_DECAP_L4_UDP)
		flags |= FL_ADJ_ROOM_DECAP_L3_IPV4 | FL_ADJ_ROOM_DECAP_L4_UDP;
	if (bpf_skb_adjust_room(skb, -FL_ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags) < 0) {
		fl_count(FL_DECAP_ERROR, pkt_len);
		return TC_ACT_SHOT;
	}
	fl_count(FL_DECAP_OK, pkt_len);
	if (cfg->flags & FL_CFG_DELIVER_PEER)
		return fl_deliver_peer(skb);
	return TC_ACT_OK;
}

FL_LICENSE

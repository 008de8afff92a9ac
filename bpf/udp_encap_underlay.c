/* flannel udp encapsulation on the underlay: tc egress (clsact, direct-action) on the external interface.
 *
 * The agent routes each peer on one of the underlay's own networks straight to it (`--udp-encap
 * underlay`): `<peer subnet> via <peer PublicIP> dev <underlay> mtu <underlay MTU - 28> src <flannel0's
 * address>`. The kernel routes the packet (FORWARD, POSTROUTING and conntrack as for any forwarded
 * packet) and resolves the peer host's MAC; this program only inserts the 28 bytes:
 *
 *   in:   [Ethernet 14, to the peer host's MAC][inner IPv4 ...]
 *   out:  [Ethernet 14][outer IPv4 20][UDP 8][inner IPv4 ...]   -> on to the underlay's qdisc
 *
 * Against the way through flannel0 (udp_encap.c) this saves a second transmit, one tc hook and
 * bpf_redirect_neigh's route and neighbour lookups per skb. Everything else the underlay sends (the
 * host's own traffic, packets encapsulated on flannel0) passes untouched, and so does a destination in
 * the Network that no peer leases: no route of ours sent it here.
 */
#include "lib/flannel.h"
#include "lib/encap.h"

FL_PROG("tc")
int flannel_ul_out(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 pkt_len = skb->len;
	struct fl_config *cfg = fl_get_config();
	struct fl_peer *peer;
	struct iphdr *ip;

	if (!cfg || skb->protocol != fl_htons(FL_ETH_P_IP)) {
		fl_count(FL_UL_PASS_OTHER, pkt_len);
		return TC_ACT_OK;
	}
	/* The Ethernet and IPv4 headers (offsets 0 and 14) must be in the linear area to be read. */
	if (data + FL_ETH_HLEN + FL_IP_HLEN > data_end) {
		if (bpf_skb_pull_data(skb, FL_ETH_HLEN + FL_IP_HLEN) < 0) {
			fl_count(FL_UL_PASS_OTHER, pkt_len);
			return TC_ACT_OK;
		}
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + FL_ETH_HLEN + FL_IP_HLEN > data_end) {
			fl_count(FL_UL_PASS_OTHER, pkt_len);
			return TC_ACT_OK;
		}
	}
	ip = data + FL_ETH_HLEN;
	/* The host's traffic leaves on the cheap test; only the Network's destinations cost a lookup. */
	if ((ip->daddr & cfg->network_mask) != cfg->network) {
		fl_count(FL_UL_PASS_OTHER, pkt_len);
		return TC_ACT_OK;
	}
	peer = fl_lookup_peer(ip->daddr);
	if (!peer) {
		fl_count(FL_UL_PASS_NO_PEER, pkt_len);
		return TC_ACT_OK;
	}

	__u32 inner_len;
	ip = fl_inner_datagram(skb, FL_ETH_HLEN, &inner_len); /* cut to the datagram, as on flannel0 */
	if (!ip) {
		fl_count(FL_ENCAP_MALFORMED, pkt_len);
		return TC_ACT_SHOT;
	}
	__u32 why = fl_carry_problem(ip, inner_len);
	if (why) {
		fl_count(why, pkt_len);
		return TC_ACT_SHOT;
	}
	/* The route's MTU (28 below the underlay's) keeps forwarded and local packets within bounds, and
	 * the kernel answers frag-needed for it; a single packet that still would not fit (a raw socket
	 * ignoring the route MTU) is dropped here. GSO packets are cut to the route MTU later. */
	if (skb->gso_size == 0) {
		__u32 mtu = inner_len;
		if (bpf_check_mtu(skb, 0, &mtu, FL_ENCAP_LEN, 0) != 0) {
			fl_count(FL_ENCAP_TOO_BIG_DROP, pkt_len);
			return TC_ACT_SHOT;
		}
	}

	/* Read before the helpers invalidate packet pointers. */
	struct fl_outer o = {
		.saddr = cfg->own_ip, .daddr = peer->public_ip, .port = cfg->port, .tos = ip->tos, .inner_len = inner_len,
	};

	/* Like flanneld's proxy (and the kernel's forwarding before us): the inner TTL drops by one. */
	fl_decrement_ttl(ip);
	o.hash = bpf_get_hash_recalc(skb);

	/* The Ethernet header stays as the kernel wrote it: the next hop is the peer host itself. */
	if (fl_push_outer(skb, &o) < 0) {
		fl_count(FL_ENCAP_ERROR, pkt_len);
		return TC_ACT_SHOT;
	}
	fl_count(FL_ENCAP_OK, pkt_len);
	return TC_ACT_OK;
}

FL_LICENSE

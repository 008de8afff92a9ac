/* The checks both decapsulation programs (XDP and tc ingress) share.
 *
 *   [Ethernet 14][outer IPv4 20][UDP 8][inner IPv4 20+ ...]
 *    0            14             34     42
 *
 * Returns FL_DECAP_OK when the packet is ours and acceptable (the inner TTL has then been
 * decremented, as flanneld's proxy does on the way in), FL_DECAP_PASS_OTHER for traffic that is not
 * the overlay's or FL_DECAP_FRAGMENT (the caller leaves both untouched), or the drop reason.
 *
 * What is accepted: UDP to our port, outer header without options, valid checksum and lengths, from
 * a PublicIP that holds a lease (fl_members), carrying an IPv4 packet for this host's subnet whose
 * source lies in a subnet that same PublicIP leases (fl_peers; FL_CFG_ALLOW_FOREIGN_SOURCE lifts
 * this last check) and whose TTL survives the decrement.
 *
 * Fragments: neither program ever decapsulates a fragment. XDP and tc ingress run before the
 * kernel reassembles, later fragments carry no UDP header, and stripping 28 bytes from a first
 * fragment would corrupt the datagram the rest belong to. So every outer fragment, first or later,
 * goes to the kernel untouched, like any other fragment: its reassembly is bounded as for all
 * traffic (ipfrag_high_thresh, ipfrag_time), and a reassembled datagram to our port finds no socket
 * there and is discarded by the kernel (UdpNoPorts). Dropping only the first fragment (the old
 * rule) left the rest in the reassembly queue for 30 s; dropping every UDP fragment to this host
 * would break other fragmented UDP (DNS, NFS) between the hosts. Our own encapsulation always
 * sets DF, so fragments here come from elsewhere (flanneld's socket after a path-MTU drop, or a
 * forger). UDP fragments from a member to us are counted as FL_DECAP_FRAGMENT, others as
 * PASS_OTHER.
 */
#ifndef FLANNEL_DECAP_H
#define FLANNEL_DECAP_H

#include "flannel.h"

#define FL_DECAP_HEADROOM (FL_ETH_HLEN + FL_ENCAP_LEN + FL_IP_HLEN) /* 62: all headers we read */

static __always_inline __u32 fl_decap_check(void *data, void *data_end, __u32 pkt_len,
					    const struct fl_config *cfg)
{
	struct ethhdr *eth = data;
	struct iphdr *outer = data + FL_ETH_HLEN;
	struct udphdr *udp;
	struct iphdr *inner;

	if ((void *)(outer + 1) > data_end)
		return FL_DECAP_PASS_OTHER;
	if (eth->h_proto != fl_htons(FL_ETH_P_IP) || outer->version != 4 || outer->protocol != IPPROTO_UDP)
		return FL_DECAP_PASS_OTHER; /* VLAN-tagged frames included: not ours to parse */
	if (outer->daddr != cfg->own_ip)
		return FL_DECAP_PASS_OTHER; /* e.g. routed through this host: not for us */
	if (fl_is_fragment(outer)) /* first or later: the kernel's (see above), counted if maybe ours */
		return fl_is_member(outer->saddr) ? FL_DECAP_FRAGMENT : FL_DECAP_PASS_OTHER;

	if (outer->ihl != 5) {
		/* Options: find the port at the real L4 offset (ihl * 4 <= 60, bounded for the verifier),
		 * but do not decapsulate: stripping a variable-length header is not worth the risk. */
		udp = (void *)outer + outer->ihl * 4;
		if ((void *)(udp + 1) > data_end || outer->ihl < 5)
			return FL_DECAP_PASS_OTHER;
		return udp->dest == cfg->port ? FL_DECAP_IP_OPTIONS : FL_DECAP_PASS_OTHER;
	}
	udp = (void *)outer + FL_IP_HLEN;
	if ((void *)(udp + 1) > data_end || udp->dest != cfg->port)
		return FL_DECAP_PASS_OTHER;

	/* From here on the packet is addressed to our flannel port: ours to accept or drop. */
	if (fl_ipv4_csum(outer) != 0)
		return FL_DECAP_MALFORMED;
	__u32 outer_len = fl_ntohs(outer->tot_len);
	__u32 udp_len = fl_ntohs(udp->len);
	if (udp_len < FL_UDP_HLEN + FL_IP_HLEN || udp_len != outer_len - FL_IP_HLEN ||
	    FL_ETH_HLEN + outer_len > pkt_len)
		return FL_DECAP_MALFORMED;
	if (!fl_is_member(outer->saddr))
		return FL_DECAP_NOT_MEMBER;

	inner = (void *)(udp + 1);
	if ((void *)(inner + 1) > data_end)
		return FL_DECAP_MALFORMED;
	if (inner->version != 4 || inner->ihl < 5 || fl_ntohs(inner->tot_len) != udp_len - FL_UDP_HLEN)
		return FL_DECAP_MALFORMED;
	if ((inner->daddr & cfg->local_mask) != cfg->local_subnet)
		return FL_DECAP_NOT_LOCAL;
	/* The inner source must be in a subnet leased by the very host that sent the packet: the
	 * longest-prefix match of the inner source gives the PublicIP leasing it, which must be the
	 * outer source. Without this, whoever can forge one member's outer address could inject packets
	 * "from" any container of any host, or from any outside address. */
	if (!(cfg->flags & FL_CFG_ALLOW_FOREIGN_SOURCE)) {
		struct fl_peer *sender = fl_lookup_peer(inner->saddr);
		if (!sender || sender->public_ip != outer->saddr)
			return FL_DECAP_FOREIGN_SOURCE;
	}
	if (inner->ttl <= 1)
		return FL_DECAP_TTL_EXPIRED;
	fl_decrement_ttl(inner);
	return FL_DECAP_OK;
}

#endif /* FLANNEL_DECAP_H */

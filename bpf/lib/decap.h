/* The checks both decapsulation programs (XDP and tc ingress) share.
 *
 *   [Ethernet 14][outer IPv4 20][UDP 8][inner IPv4 20+ ...]
 *    0            14             34     42
 *
 * Returns FL_DECAP_OK when the packet is ours and acceptable (the inner TTL has then been
 * decremented, as flanneld's proxy does on the way in), FL_DECAP_PASS_OTHER for traffic that is not
 * the overlay's (the caller leaves it untouched), or the drop reason.
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
	if (fl_is_later_fragment(outer))
		return FL_DECAP_PASS_OTHER; /* no UDP header to look at; the stack reassembles or drops */

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
	if (fl_is_fragment(outer))
		return FL_DECAP_FRAGMENT; /* the first fragment: the rest cannot be reassembled without it */
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
	if (inner->ttl <= 1)
		return FL_DECAP_TTL_EXPIRED;
	fl_decrement_ttl(inner);
	return FL_DECAP_OK;
}

#endif /* FLANNEL_DECAP_H */

/* The 28 bytes of flannel's udp encapsulation, written in front of an inner IPv4 packet that follows
 * an Ethernet header: shared by the encap on flannel0 and the one on the underlay's egress. */
#ifndef FLANNEL_ENCAP_H
#define FLANNEL_ENCAP_H

#include "flannel.h"

/* The inner IPv4 header at `offset` (0 on flannel0, an L3 device; 14 behind an Ethernet header), with
 * the skb cut to the datagram's length: bytes after it (padding, or a forged length) would make the
 * MTU check measure the wrong packet, and the underlay device drop it silently. Returns the header and
 * the datagram's length in *inner_len, or NULL for a malformed packet (the skb may be changed). */
static __always_inline struct iphdr *fl_inner_datagram(struct __sk_buff *skb, __u32 offset, __u32 *inner_len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + offset;
	__u32 skb_len = skb->len;

	if ((void *)(ip + 1) > data_end)
		return 0;
	__u32 len = fl_ntohs(ip->tot_len);
	if (ip->version != 4 || ip->ihl < 5 || len < (__u32)ip->ihl * 4 || len + offset > skb_len)
		return 0;
	if (skb_len > len + offset) {
		if (bpf_skb_change_tail(skb, len + offset, 0) < 0)
			return 0;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip = data + offset;
		if ((void *)(ip + 1) > data_end)
			return 0;
	}
	*inner_len = len;
	return ip;
}

/* Why a datagram with a peer cannot be carried (a fl_reason), or 0: its TTL would reach 0, or it is
 * over 65507 bytes (a GRO'd packet forwarded into the overlay), which the outer 16-bit length fields
 * cannot hold whole (a wrapped length would be a malformed packet). */
static __always_inline __u32 fl_carry_problem(const struct iphdr *ip, __u32 inner_len)
{
	if (ip->ttl <= 1)
		return FL_ENCAP_TTL_EXPIRED;
	if (inner_len > 0xffff - FL_ENCAP_LEN)
		return FL_ENCAP_TOO_BIG_DROP;
	return 0;
}

/* [Ethernet 14][inner IPv4 ...] -> [Ethernet 14][outer IPv4 20][UDP 8][inner IPv4 ...].
 * The Ethernet header is left as it is. Returns 0, or -1 if a helper failed (the skb may be changed).
 *
 * FIXED_GSO keeps gso_size (the route MTU already leaves room for the 28 bytes); the ENCAP flags mark
 * the skb as UDP-tunnelled, so that GSO/TSO and checksum offload still work on the inner packet.
 * `o->hash` (the kernel's flow hash of the inner 5-tuple) picks the outer source port, so that a
 * receiver's RSS/RPS spreads flows; flanneld sends from 8285, but receivers look only at the
 * destination port. */
struct fl_outer {
	__be32 saddr, daddr;     /* outer addresses: ours and the peer's PublicIP */
	__be16 port;             /* UDP destination port, network order */
	__u8 tos;                /* the inner packet's */
	__u32 inner_len;         /* the inner IPv4 packet's length */
	__u32 hash;              /* the inner flow's hash */
};

static __always_inline int fl_push_outer(struct __sk_buff *skb, const struct fl_outer *o)
{
	if (bpf_skb_adjust_room(skb, FL_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
					BPF_F_ADJ_ROOM_ENCAP_L4_UDP) < 0)
		return -1;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + FL_ETH_HLEN + FL_ENCAP_LEN > data_end)
		return -1;
	struct iphdr *outer = data + FL_ETH_HLEN;             /* offset 14 */
	struct udphdr *udp = data + FL_ETH_HLEN + FL_IP_HLEN; /* offset 34; inner IPv4 at 42 */

	outer->version = 4;
	outer->ihl = 5;
	outer->tos = o->tos; /* DSCP and ECN follow the inner packet (RFC 6040 normal mode) */
	outer->tot_len = fl_htons(o->inner_len + FL_ENCAP_LEN);
	outer->id = 0; /* DF is set: no fragment to identify */
	/* Always DF, whatever the inner packet says: a receiver's XDP/tc decap never sees a reassembled
	 * datagram (decap.h), so a router fragmenting the outer packet would lose it silently. The whole
	 * underlay path must carry the underlay MTU (the overlay's MTU is 28 below it). */
	outer->frag_off = fl_htons(FL_IP_DF);
	outer->ttl = 64;
	outer->protocol = IPPROTO_UDP;
	outer->check = 0;
	outer->saddr = o->saddr;
	outer->daddr = o->daddr;
	outer->check = fl_ipv4_csum(outer);

	udp->source = fl_htons(49152 | (o->hash & 0x3fff)); /* IANA's dynamic range 49152-65535 */
	udp->dest = o->port;
	udp->len = fl_htons(o->inner_len + FL_UDP_HLEN);
	udp->check = 0; /* legal over IPv4; the inner packet carries its own checksums */
	return 0;
}

#endif /* FLANNEL_ENCAP_H */

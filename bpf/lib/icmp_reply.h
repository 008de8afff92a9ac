/* Turn the packet in hand (tc, L3 skb starting at its IPv4 header, as on flannel0's egress) into an
 * ICMP destination-unreachable message for its sender, in place:
 *
 *   before: [IPv4 20][L4 ...]
 *   after:  [IPv4 20: tun_addr -> original source][ICMP 8][original IPv4 20][first 8 or 28 bytes of L4]
 *           0                                     20      28                48
 *
 * The caller then bpf_redirect()s it to flannel0's ingress, so the stack routes it to the sender like
 * any packet arriving from the overlay. Its source is flannel0's address (as flanneld's proxy uses),
 * which is local: flannel0 needs accept_local=1 (the backend sets it) or the stack drops it as martian.
 */
#ifndef FLANNEL_ICMP_REPLY_H
#define FLANNEL_ICMP_REPLY_H

#include "flannel.h"

/* ICMP, declared here: <linux/icmp.h> drags in libc headers that a BPF build cannot use. */
#define FL_ICMP_HLEN 8
#define FL_ICMP_ECHO_REPLY 0
#define FL_ICMP_DEST_UNREACH 3
#define FL_ICMP_ECHO 8
#define FL_ICMP_TIMESTAMP 13
#define FL_ICMP_INFO_REQUEST 15
#define FL_ICMP_ADDRESS 17
#define FL_ICMP_NET_UNREACH 0   /* code: network unreachable (what flanneld answers) */
#define FL_ICMP_FRAG_NEEDED 4   /* code: fragmentation needed and DF set */

struct fl_icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 unused;   /* 0 */
	__be16 mtu;      /* next-hop MTU for FL_ICMP_FRAG_NEEDED (RFC 1191), else 0 */
};

/* May this packet be answered with an ICMP error (RFC 1122 3.2.2)? Not when it carries IP options
 * (we only rebuild 20-byte headers), is a later fragment, or is itself an ICMP error. */
static __always_inline int fl_icmp_allowed(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data;

	if (data + FL_IP_HLEN > data_end)
		return 0;
	if (ip->ihl != 5 || fl_is_later_fragment(ip) || skb->len < FL_IP_HLEN + 8)
		return 0;
	if (ip->saddr == 0 || ip->saddr == 0xffffffff)
		return 0;
	if (ip->protocol == IPPROTO_ICMP) {
		struct fl_icmphdr *icmp = data + FL_IP_HLEN;
		if ((void *)icmp + 1 > data_end) /* the type byte */
			return 0;
		/* Only queries (echo, timestamp, ...) get an answer; errors never do. */
		if (icmp->type != FL_ICMP_ECHO && icmp->type != FL_ICMP_TIMESTAMP && icmp->type != FL_ICMP_INFO_REQUEST &&
		    icmp->type != FL_ICMP_ADDRESS)
			return 0;
	}
	return 1;
}

/* What replaces the first bytes of the packet: the ICMP header and the quoted original bytes. */
struct fl_icmp_body {
	struct fl_icmphdr icmp;
	__u8 quote[48];
};

/* Returns 0 when the skb now holds the ICMP message, -1 when it could not be built (the caller drops
 * the packet). The caller has checked fl_icmp_allowed(). The new bytes are written whole with
 * bpf_skb_store_bytes, so the result does not depend on where the helper opened the room. */
static __always_inline int fl_icmp_reply(struct __sk_buff *skb, __be32 tun_addr, __u8 code,
					 __u32 next_hop_mtu)
{
	struct fl_icmp_body body = {};
	struct iphdr ip = {};
	__u32 q_len = FL_IP_HLEN + 8; /* what RFC 792 asks: the header and 8 bytes of payload */

	if (skb->len >= 48 && bpf_skb_load_bytes(skb, 0, body.quote, 48) < 0)
		return -1;
	if (skb->len < 48 && bpf_skb_load_bytes(skb, 0, body.quote, 28) < 0)
		return -1;
	__be32 orig_saddr = ((struct iphdr *)body.quote)->saddr;

	/* Trim to what is quoted. A CHECKSUM_PARTIAL skb cannot be cut before its checksum field (the
	 * helper refuses: TCP's sits at byte 36), so quote 48 bytes then, which RFC 1812 allows. */
	if (bpf_skb_change_tail(skb, q_len, 0) < 0) {
		q_len = 48;
		if (skb->len < q_len || bpf_skb_change_tail(skb, q_len, 0) < 0)
			return -1;
	}
	/* 28 more bytes in front. On flannel0's egress the MAC header is empty, so BPF_ADJ_ROOM_MAC
	 * pushes at the very start and moves the network header there too: bpf_redirect() to an L3
	 * device's ingress strips everything in front of the network header. */
	if (bpf_skb_adjust_room(skb, FL_IP_HLEN + FL_ICMP_HLEN, BPF_ADJ_ROOM_MAC, 0) < 0)
		return -1;

	body.icmp.type = FL_ICMP_DEST_UNREACH;
	body.icmp.code = code;
	body.icmp.mtu = fl_htons(next_hop_mtu); /* 0 unless code is FL_ICMP_FRAG_NEEDED */
	__s64 sum = q_len == 48 ? bpf_csum_diff(0, 0, (__be32 *)&body, FL_ICMP_HLEN + 48, 0)
				: bpf_csum_diff(0, 0, (__be32 *)&body, FL_ICMP_HLEN + 28, 0);
	if (sum < 0)
		return -1;
	body.icmp.checksum = fl_csum_fold((__u32)sum);

	ip.version = 4;
	ip.ihl = 5;
	ip.tos = 0xc0; /* precedence "internetwork control", as the kernel's own ICMP errors */
	ip.tot_len = fl_htons(FL_IP_HLEN + FL_ICMP_HLEN + q_len);
	ip.ttl = 64;
	ip.protocol = IPPROTO_ICMP;
	ip.saddr = tun_addr;
	ip.daddr = orig_saddr;
	ip.check = fl_ipv4_csum(&ip);

	if (bpf_skb_store_bytes(skb, 0, &ip, FL_IP_HLEN, 0) < 0)
		return -1;
	if (q_len == 48)
		return bpf_skb_store_bytes(skb, FL_IP_HLEN, &body, FL_ICMP_HLEN + 48, 0) < 0 ? -1 : 0;
	return bpf_skb_store_bytes(skb, FL_IP_HLEN, &body, FL_ICMP_HLEN + 28, 0) < 0 ? -1 : 0;
}

#endif /* FLANNEL_ICMP_REPLY_H */

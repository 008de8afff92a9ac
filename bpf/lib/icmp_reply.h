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

/* The rate limit: what the kernel allows by default for all its ICMP errors together
 * (net.ipv4.icmp_msgs_per_sec = 1000, icmp_msgs_burst = 50), kept per CPU rather than per host, so a
 * host with N CPUs sends at most N times that. The kernel's per-destination limit (icmp_ratelimit,
 * 1 s per peer) needs a table of destinations; this global bucket bounds the total instead, which is
 * what stops a flood of packets to unleased addresses (or of oversized ones) from becoming a flood
 * of replies. */
#define FL_ICMP_COST_NS 1000000ULL /* 1 ms of credit per message: 1000 messages per second */
#define FL_ICMP_BURST 50ULL

/* Take one message's credit from this CPU's bucket: 1 if an ICMP error may go now, 0 if not. */
static __always_inline int fl_icmp_take_token(void)
{
	struct fl_icmp_bucket *b = fl_get_icmp_bucket();
	__u64 now = bpf_ktime_get_ns();

	if (!b)
		return 0;
	__u64 credit = b->credit_ns + (now - b->stamp_ns); /* a zeroed slot: "now" of credit, i.e. full */
	if (credit > FL_ICMP_BURST * FL_ICMP_COST_NS)
		credit = FL_ICMP_BURST * FL_ICMP_COST_NS;
	b->stamp_ns = now;
	if (credit < FL_ICMP_COST_NS) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - FL_ICMP_COST_NS;
	return 1;
}

/* Is `addr` (network order) a unicast host one may send an ICMP error to? Not 0.0.0.0/8 ("this
 * network"), 127.0.0.0/8 (loopback), 224.0.0.0/4 (multicast) or 240.0.0.0/4 (class E, which holds
 * 255.255.255.255): the kernel treats these as martian sources and never answers them. Link-local
 * 169.254.0.0/16 is a unicast source on its link, routed back like any other: answered. */
static __always_inline int fl_icmp_unicast_source(__be32 addr)
{
	__u8 first = ((__u8 *)&addr)[0]; /* the first octet: network order is byte order */

	return first != 0 && first != 127 && first < 224;
}

/* May this packet be answered with an ICMP error, and may one go now? Returns 0 if so; else the
 * reason to count for the dropped packet:
 *   `refused`                   RFC 1122 3.2.2 forbids an answer, or we cannot build one: IP options
 *                               (we only rebuild 20-byte headers), a later fragment, shorter than a
 *                               header and 8 bytes, or itself an ICMP error;
 *   FL_ENCAP_ICMP_BAD_SOURCE    the source is no unicast host (fl_icmp_unicast_source);
 *   FL_ENCAP_ICMP_RATE_LIMITED  this CPU's bucket is empty.
 * The bucket is consulted last, so only replies that would really go spend credit. */
static __always_inline __u32 fl_icmp_check(struct __sk_buff *skb, __u32 refused)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data;

	if (data + FL_IP_HLEN > data_end)
		return refused;
	if (ip->ihl != 5 || fl_is_later_fragment(ip) || skb->len < FL_IP_HLEN + 8)
		return refused;
	if (ip->protocol == IPPROTO_ICMP) {
		struct fl_icmphdr *icmp = data + FL_IP_HLEN;
		if ((void *)icmp + 1 > data_end) /* the type byte */
			return refused;
		/* Only queries (echo, timestamp, ...) get an answer; errors never do. */
		if (icmp->type != FL_ICMP_ECHO && icmp->type != FL_ICMP_TIMESTAMP && icmp->type != FL_ICMP_INFO_REQUEST &&
		    icmp->type != FL_ICMP_ADDRESS)
			return refused;
	}
	if (!fl_icmp_unicast_source(ip->saddr))
		return FL_ENCAP_ICMP_BAD_SOURCE;
	if (!fl_icmp_take_token())
		return FL_ENCAP_ICMP_RATE_LIMITED;
	return 0;
}

/* What replaces the first bytes of the packet: the ICMP header and the quoted original bytes. */
struct fl_icmp_body {
	struct fl_icmphdr icmp;
	__u8 quote[48];
};

/* Returns 0 when the skb now holds the ICMP message, -1 when it could not be built (the caller drops
 * the packet). The caller has checked fl_icmp_check(). The new bytes are written whole with
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
	 * helper refuses: TCP's sits at byte 36), so quote 48 bytes then, which RFC 1812 allows. Nor
	 * before its transport header: when the kernel's flow dissector followed a tunnel protocol (IPIP,
	 * IPv6-in-IPv4, GRE) past byte 48, no reply is built and the caller counts its *_DROP reason. */
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

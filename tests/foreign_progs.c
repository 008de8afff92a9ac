/* "Another tool's" programs, for the cohabitation tests: they share the underlay NIC's hooks with
 * flannel-ebpf. Each drops one marked packet, so a test can see that it still runs, and passes
 * everything else.
 *
 *   foreign_xdp   XDP: drops IPv4 packets of total length FOREIGN_XDP_MARK, XDP_PASS otherwise
 *   foreign_tc    tc (direct-action): drops IPv4 packets of total length FOREIGN_TC_MARK, and
 *                 returns TC_ACT_UNSPEC for the rest (the next filter, or the default, decides)
 *
 * Loaded with iproute2 (`ip link set dev D xdp obj foreign_progs.o sec xdp`,
 * `tc filter add dev D ingress prio P bpf da obj foreign_progs.o sec tc`), compiled by the tests with
 * `clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c`.
 * A ping of `-s N` makes an IPv4 packet of N + 28 bytes.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))

#ifndef FOREIGN_XDP_MARK
#define FOREIGN_XDP_MARK 1000
#endif
#ifndef FOREIGN_TC_MARK
#define FOREIGN_TC_MARK 1001
#endif

static inline __attribute__((always_inline)) int marked(void *data, void *data_end, __u16 mark)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end)
		return 0;
	if (eth->h_proto != __builtin_bswap16(ETH_P_IP))
		return 0;
	return ip->tot_len == __builtin_bswap16(mark);
}

SEC("xdp")
int foreign_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	return marked(data, data_end, FOREIGN_XDP_MARK) ? XDP_DROP : XDP_PASS;
}

SEC("tc")
int foreign_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	return marked(data, data_end, FOREIGN_TC_MARK) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "GPL";

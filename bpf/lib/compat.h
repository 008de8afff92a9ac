/* One spelling for two loaders.
 *
 * The same C sources are compiled either by bcc at agent start-up (the bcc loader passes
 * -DFLANNEL_BCC=1 and -DFLANNEL_PIN_DIR="...") or ahead of time by plain clang
 * (`clang -target bpf -O2 -I/usr/include/x86_64-linux-gnu -c udp_encap.c`) for the ELF loader and
 * for `tc ... bpf da obj X.o sec tc` / `ip link set dev D xdp obj X.o sec xdp`.
 *
 * This header hides the differences: map definitions, program sections, the license, and the
 * helper declarations that bcc provides itself but plain clang does not.
 * Map *accesses* cannot be hidden in a macro (bcc refuses to rewrite `map.lookup()` inside a macro),
 * so flannel.h gives each map a small accessor function with an #ifdef inside.
 */
#ifndef FLANNEL_COMPAT_H
#define FLANNEL_COMPAT_H

#ifdef FLANNEL_BCC
/* bcc: helpers.h (auto-included) already declares every helper and the kernel headers come from
 * /lib/modules/$(uname -r)/build. bcc places each function in its own section by itself. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#ifndef FLANNEL_PIN_DIR
#error "the bcc loader must define FLANNEL_PIN_DIR"
#endif

/* BPF_TABLE_PINNED opens the pin if it exists (a restarted agent adopts the live maps), else
 * creates the map and pins it there. */
#define FL_MAP(_kind_bcc, _kind_uapi, _name, _key, _value, _max, _flags) \
	BPF_TABLE_PINNED(_kind_bcc, _key, _value, _name, _max, FLANNEL_PIN_DIR "/" #_name, _flags)
#define FL_PROG(_section)
#define FL_LICENSE

#else /* plain clang -target bpf */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>

#define SEC(_name) __attribute__((section(_name), used))
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* A legacy map definition in SEC("maps"). Its layout is iproute2's `struct bpf_elf_map`, so that
 * `tc filter ... bpf obj` can load our objects too; our own ELF loader reads the same nine u32s. */
struct fl_map_def {
	__u32 type;        /* BPF_MAP_TYPE_* */
	__u32 key_size;
	__u32 value_size;
	__u32 max_entries;
	__u32 map_flags;   /* BPF_F_NO_PREALLOC, ... */
	__u32 id;          /* iproute2 only: unused (0) */
	__u32 pinning;     /* iproute2 only: 0 = not pinned by tc; our loaders pin under --bpf-pin-dir */
	__u32 inner_id;    /* iproute2 only: unused */
	__u32 inner_idx;   /* iproute2 only: unused */
};

#define FL_MAP(_kind_bcc, _kind_uapi, _name, _key, _value, _max, _flags) \
	struct fl_map_def SEC("maps") _name = {                                \
		.type = _kind_uapi,                                            \
		.key_size = sizeof(_key),                                      \
		.value_size = sizeof(_value),                                  \
		.max_entries = _max,                                           \
		.map_flags = _flags,                                           \
	}
#define FL_PROG(_section) SEC(_section)
#define FL_LICENSE char _license[] SEC("license") = "GPL";

/* Helper declarations (numbers from linux/bpf.h); bcc declares these itself. */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_change_head)(struct __sk_buff *skb, __u32 len, __u64 flags) =
	(void *)BPF_FUNC_skb_change_head;
static long (*bpf_skb_change_tail)(struct __sk_buff *skb, __u32 len, __u64 flags) =
	(void *)BPF_FUNC_skb_change_tail;
static long (*bpf_skb_adjust_room)(struct __sk_buff *skb, __s32 len_diff, __u32 mode, __u64 flags) =
	(void *)BPF_FUNC_skb_adjust_room;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
	(void *)BPF_FUNC_skb_load_bytes;
static long (*bpf_skb_store_bytes)(struct __sk_buff *skb, __u32 offset, const void *from, __u32 len,
				   __u64 flags) = (void *)BPF_FUNC_skb_store_bytes;
static long (*bpf_skb_pull_data)(struct __sk_buff *skb, __u32 len) = (void *)BPF_FUNC_skb_pull_data;
static __u32 (*bpf_get_hash_recalc)(struct __sk_buff *skb) = (void *)BPF_FUNC_get_hash_recalc;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect;
static long (*bpf_check_mtu)(void *ctx, __u32 ifindex, __u32 *mtu_len, __s32 len_diff, __u64 flags) =
	(void *)BPF_FUNC_check_mtu;
static __s64 (*bpf_csum_diff)(__be32 *from, __u32 from_size, __be32 *to, __u32 to_size, __u32 seed) =
	(void *)BPF_FUNC_csum_diff;
static long (*bpf_xdp_adjust_head)(struct xdp_md *xdp_md, int delta) = (void *)BPF_FUNC_xdp_adjust_head;
static __u64 (*bpf_xdp_get_buff_len)(struct xdp_md *xdp_md) = (void *)BPF_FUNC_xdp_get_buff_len;
static long (*bpf_redirect_peer)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect_peer;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)BPF_FUNC_ktime_get_ns;
static long (*bpf_fib_lookup)(void *ctx, struct bpf_fib_lookup *params, int plen, __u32 flags) =
	(void *)BPF_FUNC_fib_lookup;
#endif /* FLANNEL_BCC */

/* bpf_redirect_neigh takes 4 arguments in the kernel (ifindex, params, plen, flags); bcc 0.26's
 * helpers.h declares it with 3, which would leave the flags register undefined. Our own
 * spelling (a call through the helper number, under another name) is right for both loaders. */
#define fl_redirect_neigh(_ifindex, _params, _plen, _flags) \
	((long (*)(__u32, void *, int, __u64))BPF_FUNC_redirect_neigh)(_ifindex, _params, _plen, _flags)

/* bpf_skb_adjust_room() decap flags newer than the 6.1 headers we compile against (values from
 * include/uapi/linux/bpf.h, enum bpf_adj_room_flags; own names, since the enum may or may not
 * have them): DECAP_L3_IPV4 (6.3) sets skb->protocol to IPv4; DECAP_L4_UDP (bpf-next, 2026) also
 * clears skb->encapsulation and the UDP tunnel GSO bits. A kernel that lacks a flag returns
 * -EINVAL without changing the skb. */
#define FL_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define FL_ADJ_ROOM_DECAP_L4_UDP (1ULL << 10)
#define FL_EINVAL 22 /* what helpers return, negated, for flags they do not know */
#define FL_AF_INET 2 /* sys/socket.h's, for bpf_fib_lookup() and bpf_redirect_neigh() */

/* Byte order: BPF runs in the host's order (little endian on x86-64); packets are big endian. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define fl_htons(x) ((__be16)__builtin_bswap16(x))
#define fl_htonl(x) ((__be32)__builtin_bswap32(x))
#else
#define fl_htons(x) ((__be16)(x))
#define fl_htonl(x) ((__be32)(x))
#endif
#define fl_ntohs(x) fl_htons(x)

#endif /* FLANNEL_COMPAT_H */

/* flannel udp decapsulation: XDP on the underlay NIC.
 *
 *   in:   [Ethernet 14][outer IPv4 20][UDP 8][inner IPv4 ...]
 *   out:  [Ethernet 14][inner IPv4 ...]                          -> XDP_PASS
 *
 * The Ethernet header moves forward by 28 bytes and bpf_xdp_adjust_head() drops what is in front
 * of it, so the stack sees the inner packet as if it had arrived on the underlay directly.
 * Everything that is not overlay traffic passes untouched.
 */
#include "lib/flannel.h"
#include "lib/decap.h"

/* xdp.frags: the program reads multi-buffer frames correctly (whole length from
 * bpf_xdp_get_buff_len, headers in the first buffer), so it may run on jumbo-MTU devices. */
FL_PROG("xdp.frags")
int flannel_xdp_in(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* The whole frame: a multi-buffer (xdp.frags) frame is longer than its first buffer. */
	__u32 pkt_len = bpf_xdp_get_buff_len(ctx);
	struct fl_config *cfg = fl_get_config();

	if (!cfg) {
		fl_count(FL_DECAP_NO_CONFIG, pkt_len);
		return XDP_PASS;
	}
	__u32 verdict = fl_decap_check(data, data_end, pkt_len, cfg);
	if (verdict == FL_DECAP_PASS_OTHER || verdict == FL_DECAP_FRAGMENT) { /* untouched (decap.h) */
		fl_count(verdict, pkt_len);
		return XDP_PASS;
	}
	if (verdict != FL_DECAP_OK) {
		fl_count(verdict, pkt_len);
		return XDP_DROP;
	}

	/* Keep the Ethernet header (MACs, type IPv4) for after the move. */
	struct ethhdr eth_copy;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end) /* checked by fl_decap_check; the verifier wants it here */
		return XDP_PASS;
	__builtin_memcpy(&eth_copy, eth, sizeof(eth_copy));

	if (bpf_xdp_adjust_head(ctx, FL_ENCAP_LEN) < 0) {
		fl_count(FL_DECAP_ERROR, pkt_len);
		return XDP_DROP;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end) {
		fl_count(FL_DECAP_ERROR, pkt_len);
		return XDP_DROP;
	}
	__builtin_memcpy(eth, &eth_copy, sizeof(eth_copy));
	fl_count(FL_DECAP_OK, pkt_len);
	return XDP_PASS;
}

FL_LICENSE

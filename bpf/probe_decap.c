/* A kernel probe, run once by the agent with BPF_PROG_TEST_RUN on a crafted flannel packet, never
 * attached: does bpf_skb_adjust_room() know BPF_F_ADJ_ROOM_DECAP_L4_UDP (bpf-next 2026-08, so kernel
 * 7.3 at the earliest)? A kernel that lacks the flag returns -EINVAL without touching the skb.
 * Returns 1 when the flag is known, 0 otherwise.
 */
#include "lib/flannel.h"

FL_PROG("tc")
int flannel_probe_decap(struct __sk_buff *skb)
{
	return bpf_skb_adjust_room(skb, -FL_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				   BPF_F_ADJ_ROOM_FIXED_GSO | FL_ADJ_ROOM_DECAP_L3_IPV4 |
					   FL_ADJ_ROOM_DECAP_L4_UDP) == 0;
}

FL_LICENSE

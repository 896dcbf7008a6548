/* bad_descriptor.c — one file, several broken plugins, chosen at compile time with
 * -DMODE_REFUSE, -DMODE_SMALL, -DMODE_BAD_KIND, -DMODE_NO_CREATE or -DMODE_LONG_SECRET.
 * Each must be refused at load with its own clear error. */
#include "patchbay_connector.h"

static int32_t start(pb_instance *i, const pb_sink *e) { (void)i; (void)e; return PB_OK; }
static int32_t stop(pb_instance *i, const pb_sink *e) { (void)i; (void)e; return PB_OK; }
static void destroy(pb_instance *i) { (void)i; }
#if defined(MODE_LONG_SECRET)
static int32_t start_as_create(const pb_host *h, const uint8_t *c, size_t n, pb_instance **o,
                               const pb_sink *e) {
    (void)h; (void)c; (void)n; (void)o; (void)e;
    return PB_ERROR;
}
#endif

static const pb_connector_v1 DESCRIPTOR = {
#if defined(MODE_SMALL)
    .struct_size = 16, /* only the header and kind */
#else
    .struct_size = sizeof(pb_connector_v1),
#endif
    .abi_version = PB_ABI_VERSION,
#if defined(MODE_BAD_KIND)
    .kind = "Bad-Kind",
#else
    .kind = "broken",
#endif
    .version = "0.0.1",
#if defined(MODE_LONG_SECRET)
    .create = start_as_create,
#else
    .create = NULL, /* MODE_NO_CREATE; the other modes are refused before it matters */
#endif
    .start = start,
    .stop = stop,
    .destroy = destroy,
#if defined(MODE_LONG_SECRET)
    /* A 67-byte name: longer than PB_MAX_SECRET_KEY_LEN (64). */
    .secret_keys = "token\0"
                   "a_name_of_sixty_five_bytes_is_one_byte_longer_than_the_header_allow",
#endif
};

PB_EXPORT const pb_connector_v1 *patchbay_connector_v1(uint32_t host_abi_version) {
#if defined(MODE_REFUSE)
    /* Only serves a (made-up) host version 12345: refuses every real host. */
    return host_abi_version == 12345u ? &DESCRIPTOR : NULL;
#else
    (void)host_abi_version;
    return &DESCRIPTOR;
#endif
}

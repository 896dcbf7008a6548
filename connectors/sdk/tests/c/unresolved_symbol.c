/* unresolved_symbol.c — a complete-looking connector that calls a function no loaded
 * library provides (say, it was built against a newer libfoo than the one installed).
 * Bound lazily, it would load fine and crash the daemon at its first create; the host
 * binds every symbol at load and must refuse it there. */
#include "patchbay_connector.h"

extern int32_t pb_fixture_function_nobody_defines(void);

struct pb_instance {
    int unused;
};

static int32_t u_create(const pb_host *host, const uint8_t *config, size_t len,
                        pb_instance **out, const pb_sink *err) {
    (void)host; (void)config; (void)len; (void)out; (void)err;
    return pb_fixture_function_nobody_defines();
}

static int32_t u_start(pb_instance *inst, const pb_sink *err) {
    (void)inst; (void)err;
    return PB_OK;
}

static int32_t u_stop(pb_instance *inst, const pb_sink *err) {
    (void)inst; (void)err;
    return PB_OK;
}

static void u_destroy(pb_instance *inst) { (void)inst; }

static const pb_connector_v1 DESCRIPTOR = {
    .struct_size = sizeof(pb_connector_v1),
    .abi_version = PB_ABI_VERSION,
    .kind = "unresolved",
    .version = "1.0.0",
    .create = u_create,
    .start = u_start,
    .stop = u_stop,
    .destroy = u_destroy,
};

PB_EXPORT const pb_connector_v1 *patchbay_connector_v1(uint32_t host_abi_version) {
    (void)host_abi_version;
    return &DESCRIPTOR;
}

/* wrong_version.c — exports the entry symbol, but its descriptor claims ABI version 999:
 * the host must refuse it without touching anything past the header. */
#include "patchbay_connector.h"

static const pb_connector_v1 DESCRIPTOR = {
    .struct_size = sizeof(pb_connector_v1),
    .abi_version = 999,
    .kind = "wrong_version",
    .version = "0.0.1",
};

PB_EXPORT const pb_connector_v1 *patchbay_connector_v1(uint32_t host_abi_version) {
    (void)host_abi_version;
    return &DESCRIPTOR;
}

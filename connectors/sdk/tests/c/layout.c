/* layout.c — prints the header's struct layout, so the tests can check that the Rust
 * `abi` module mirrors it exactly. Output: one "name value" per line. */
#include "patchbay_connector.h"

#include <stdio.h>

#define OFF(type, field) printf(#type "." #field " %zu\n", offsetof(type, field))
#define SIZE(type) printf(#type " %zu\n", sizeof(type))

int main(void) {
    SIZE(pb_sink);
    OFF(pb_sink, ctx);
    OFF(pb_sink, write);
    SIZE(pb_host);
    OFF(pb_host, struct_size);
    OFF(pb_host, abi_version);
    OFF(pb_host, ctx);
    OFF(pb_host, emit);
    OFF(pb_host, log);
    OFF(pb_host, flush);
    printf("PB_HOST_V1_MIN_SIZE %zu\n", (size_t)PB_HOST_V1_MIN_SIZE);
    SIZE(pb_connector_v1);
    OFF(pb_connector_v1, struct_size);
    OFF(pb_connector_v1, abi_version);
    OFF(pb_connector_v1, kind);
    OFF(pb_connector_v1, version);
    OFF(pb_connector_v1, create);
    OFF(pb_connector_v1, start);
    OFF(pb_connector_v1, send);
    OFF(pb_connector_v1, status);
    OFF(pb_connector_v1, stop);
    OFF(pb_connector_v1, destroy);
    OFF(pb_connector_v1, secret_keys);
    printf("PB_CONNECTOR_V1_MIN_SIZE %zu\n", (size_t)PB_CONNECTOR_V1_MIN_SIZE);
    printf("PB_CONNECTOR_SECRET_KEYS_MIN_SIZE %zu\n", (size_t)PB_CONNECTOR_SECRET_KEYS_MIN_SIZE);
    printf("PB_MAX_SECRET_KEY_LEN %u\nPB_MAX_SECRET_KEYS %u\n", PB_MAX_SECRET_KEY_LEN,
           PB_MAX_SECRET_KEYS);
    printf("PB_ABI_VERSION %u\n", PB_ABI_VERSION);
    printf("PB_MAX_PAYLOAD_BYTES %u\n", PB_MAX_PAYLOAD_BYTES);
    printf("PB_MAX_JSON_DEPTH %u\n", PB_MAX_JSON_DEPTH);
    printf("PB_MAX_TEXT_BYTES %u\n", PB_MAX_TEXT_BYTES);
    printf("PB_MAX_ATTACHMENTS %u\n", PB_MAX_ATTACHMENTS);
    printf("PB_MAX_ATTACHMENTS_BYTES %u\n", PB_MAX_ATTACHMENTS_BYTES);
    printf("PB_MAX_SENDER_FIELD_CHARS %u\n", PB_MAX_SENDER_FIELD_CHARS);
    printf("PB_OK %d\nPB_ERROR %d\nPB_PANICKED %d\nPB_BUSY %d\nPB_UNSUPPORTED %d\n", PB_OK,
           PB_ERROR, PB_PANICKED, PB_BUSY, PB_UNSUPPORTED);
    return 0;
}

/*
 * misbehaving.c — a connector (kind "misbehaving") that breaks the rules on request, to
 * test that the host turns each breach into an error value. One instance per library
 * copy: it keeps its host in a global so the test can emit from outside any call
 * (through the exported misbehaving_emit) and count calls (misbehaving_calls).
 *
 * The send payload's "text" picks the misbehaviour:
 *   "garbage"     send returns PB_OK with output that is not JSON
 *   "no_body"     send returns PB_ERROR without writing an error object
 *   "weird"       send returns 42
 *   "panic"       send writes an error object and returns PB_PANICKED
 *   "unsupported" send returns PB_UNSUPPORTED
 *   "wrong_type"  send returns PB_OK with JSON that has an external_message_id but is
 *                 not {"type":"sent",...}
 *   "block"       send waits until the test calls misbehaving_release, then succeeds
 *   anything else a normal {"type":"sent",...}
 * status writes more than PB_MAX_PAYLOAD_BYTES when the config contains "huge_status".
 * stop answers PB_BUSY once when the config contains "busy_stop_once", and every time
 * with "busy_stop_always" (a plugin that never stops).
 * misbehaving_flush calls the host's flush callback (revision 1.1) from any thread.
 */
#define _GNU_SOURCE /* memmem, nanosleep */
#include "patchbay_connector.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct pb_instance {
    int huge_status;
    int busy_stops; /* PB_BUSY answers left from stop; -1 = forever */
};

static const pb_host *g_host;
static atomic_int g_calls;
static int g_destroyed;
static atomic_int g_stops;
static atomic_int g_release;

PB_EXPORT void misbehaving_release(void) { atomic_store(&g_release, 1); }
PB_EXPORT int misbehaving_stops(void) { return atomic_load(&g_stops); }

PB_EXPORT int32_t misbehaving_emit(const char *json) {
    if (!g_host) return -1;
    return g_host->emit(g_host->ctx, (const uint8_t *)json, strlen(json));
}

PB_EXPORT int32_t misbehaving_emit_len(size_t len) {
    if (!g_host) return -1;
    uint8_t *buf = malloc(len);
    if (!buf) return -1;
    memset(buf, ' ', len);
    int32_t rc = g_host->emit(g_host->ctx, buf, len);
    free(buf);
    return rc;
}

/* Calls the host's flush from the test's thread: -1 without a host or a flush. */
PB_EXPORT int32_t misbehaving_flush(uint32_t timeout_ms) {
    if (!g_host || !PB_HOST_HAS(g_host, flush) || !g_host->flush) return -1;
    return g_host->flush(g_host->ctx, timeout_ms);
}

PB_EXPORT int misbehaving_calls(void) { return g_calls; }
PB_EXPORT int misbehaving_destroyed(void) { return g_destroyed; }

static void put(const pb_sink *s, const char *text) {
    if (s && s->write) s->write(s->ctx, (const uint8_t *)text, strlen(text));
}

static int has(const uint8_t *json, size_t len, const char *needle) {
    return memmem(json, len, needle, strlen(needle)) != NULL;
}

static int32_t m_create(const pb_host *host, const uint8_t *config, size_t len, pb_instance **out,
                        const pb_sink *err) {
    (void)err;
    pb_instance *inst = calloc(1, sizeof *inst);
    if (!inst) return PB_ERROR;
    inst->huge_status = has(config, len, "huge_status");
    inst->busy_stops = has(config, len, "busy_stop_always") ? -1
                     : has(config, len, "busy_stop_once")   ? 1
                                                            : 0;
    g_host = host;
    *out = inst;
    return PB_OK;
}

static int32_t m_start(pb_instance *inst, const pb_sink *err) {
    (void)inst; (void)err;
    g_calls++;
    return PB_OK;
}

static int32_t m_send(pb_instance *inst, const uint8_t *msg, size_t len, const pb_sink *out) {
    (void)inst;
    g_calls++;
    if (has(msg, len, "\"text\":\"garbage\"")) {
        put(out, "this is not json");
        return PB_OK;
    }
    if (has(msg, len, "\"text\":\"wrong_type\"")) {
        put(out, "{\"type\":\"status\",\"external_message_id\":\"m-1\"}");
        return PB_OK;
    }
    if (has(msg, len, "\"text\":\"no_body\"")) return PB_ERROR;
    if (has(msg, len, "\"text\":\"weird\"")) return 42;
    if (has(msg, len, "\"text\":\"unsupported\"")) return PB_UNSUPPORTED;
    if (has(msg, len, "\"text\":\"block\"")) {
        const struct timespec ms = {0, 1000000};
        while (!atomic_load(&g_release)) nanosleep(&ms, NULL);
    }
    if (has(msg, len, "\"text\":\"panic\"")) {
        put(out, "{\"type\":\"error\",\"code\":\"panicked\",\"message\":\"C++ exception: boom\","
                 "\"retryable\":false}");
        return PB_PANICKED;
    }
    put(out, "{\"type\":\"sent\",\"external_message_id\":\"m-1\"}");
    return PB_OK;
}

static int32_t m_status(pb_instance *inst, const pb_sink *out) {
    g_calls++;
    if (inst->huge_status) {
        static char chunk[64 * 1024];
        memset(chunk, 'x', sizeof chunk);
        for (int i = 0; i < 20; i++) out->write(out->ctx, (const uint8_t *)chunk, sizeof chunk);
        return PB_OK;
    }
    put(out, "{\"type\":\"status\",\"state\":\"connected\"}");
    return PB_OK;
}

static int32_t m_stop(pb_instance *inst, const pb_sink *err) {
    (void)err;
    g_calls++;
    g_stops++;
    if (inst->busy_stops != 0) {
        if (inst->busy_stops > 0) inst->busy_stops--;
        return PB_BUSY;
    }
    return PB_OK;
}

static void m_destroy(pb_instance *inst) {
    g_destroyed++;
    free(inst);
}

static const pb_connector_v1 DESCRIPTOR = {
    .struct_size = sizeof(pb_connector_v1),
    .abi_version = PB_ABI_VERSION,
    .kind = "misbehaving",
    .version = "6.6.6",
    .create = m_create,
    .start = m_start,
    .send = m_send,
    .status = m_status,
    .stop = m_stop,
    .destroy = m_destroy,
};

PB_EXPORT const pb_connector_v1 *patchbay_connector_v1(uint32_t host_abi_version) {
    (void)host_abi_version;
    return &DESCRIPTOR;
}

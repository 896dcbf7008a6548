/*
 * hello_connector.c — a complete, minimal patchbay connector written in C against
 * patchbay_connector.h (kind "hello"). Used by the SDK's host tests and by the daemon's
 * end-to-end tests, and meant to be read as an example.
 *
 * Behaviour:
 *   create  accepts any JSON object as config (anything else: invalid_config). A config
 *           containing "fail_start" makes start fail.
 *   start   emits status connecting, status connected (number +15550001000, display
 *           name "Hello C"), then one inbound message: chat "hello-chat-1", id
 *           "hello-1", from +15550002000, text "hello from C".
 *   send    answers {"type":"sent","external_message_id":"hello-out-N"} and emits a
 *           delivered receipt for the host message id.
 *   status  connected / disconnected.
 *   stop    emits status disconnected.
 *
 * Its config key "api_key" is declared secret (header section 7): the host never shows
 * its value. Built with -DHELLO_REVISION_1_1 the descriptor has the size of header
 * revision 1.1 (up to `destroy`), as a plugin built before revision 1.2 has: the host
 * must then ignore secret_keys and see no secrets.
 *
 * It has no threads: every emit happens inside a host call, which the ABI allows.
 * It accepts hosts of header revision 1.0 (PB_HOST_V1_MIN_SIZE) and uses no later
 * callback; a connector that acknowledges messages to its messenger would call
 * host->flush where PB_HOST_HAS(host, flush) (see the header, section 6).
 *
 * Build: cc -shared -fPIC -I connectors/sdk/include -o libhello.so hello_connector.c
 */
#define _GNU_SOURCE /* memmem */
#include "patchbay_connector.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct pb_instance {
    const pb_host *host;
    int running;
    int fail_start;
    long long sent;
};

static void sink_str(const pb_sink *sink, const char *s) {
    if (sink && sink->write) sink->write(sink->ctx, (const uint8_t *)s, strlen(s));
}

static void error_json(const pb_sink *sink, const char *code, const char *message) {
    char buf[512];
    snprintf(buf, sizeof buf,
             "{\"type\":\"error\",\"code\":\"%s\",\"message\":\"%s\",\"retryable\":false}",
             code, message);
    sink_str(sink, buf);
}

static void log_info(pb_instance *inst, const char *msg) {
    if (inst->host->log) inst->host->log(inst->host->ctx, PB_LOG_INFO, (const uint8_t *)msg, strlen(msg));
}

/* Emits one event, backing off while the host answers PB_BUSY (up to ~1 s). */
static int32_t emit(pb_instance *inst, const char *json) {
    struct timespec pause = {0, 1000000}; /* 1 ms */
    for (int attempt = 0; attempt < 200; attempt++) {
        int32_t rc = inst->host->emit(inst->host->ctx, (const uint8_t *)json, strlen(json));
        if (rc != PB_BUSY) return rc;
        nanosleep(&pause, NULL);
        if (pause.tv_nsec < 4000000) pause.tv_nsec *= 2;
    }
    return PB_BUSY;
}

/* Finds `"key":` in a flat JSON object and parses the integer after it. Enough for a
 * fixture; a real connector uses a JSON library. */
static int json_int(const uint8_t *json, size_t len, const char *key, long long *out) {
    char *copy = malloc(len + 1);
    if (!copy) return 0;
    memcpy(copy, json, len);
    copy[len] = 0;
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\":", key);
    char *at = strstr(copy, pattern);
    int ok = 0;
    if (at) {
        char *end = NULL;
        *out = strtoll(at + strlen(pattern), &end, 10);
        ok = end != at + strlen(pattern);
    }
    free(copy);
    return ok;
}

static int32_t hello_create(const pb_host *host, const uint8_t *config, size_t len,
                            pb_instance **out, const pb_sink *err) {
    if (!host || !out || host->abi_version != PB_ABI_VERSION ||
        host->struct_size < PB_HOST_V1_MIN_SIZE || !host->emit) {
        error_json(err, "unsupported_host", "host callbacks are not ABI version 1");
        return PB_UNSUPPORTED;
    }
    size_t i = 0;
    while (i < len && (config[i] == ' ' || config[i] == '\n' || config[i] == '\t')) i++;
    if (i == len || config[i] != '{') {
        error_json(err, "invalid_config", "config must be a JSON object");
        return PB_ERROR;
    }
    pb_instance *inst = calloc(1, sizeof *inst);
    if (!inst) {
        error_json(err, "out_of_memory", "cannot allocate the instance");
        return PB_ERROR;
    }
    inst->host = host;
    inst->fail_start = memmem(config, len, "fail_start", strlen("fail_start")) != NULL;
    *out = inst;
    return PB_OK;
}

static int32_t hello_start(pb_instance *inst, const pb_sink *err) {
    emit(inst, "{\"type\":\"status\",\"state\":\"connecting\"}");
    if (inst->fail_start) {
        emit(inst, "{\"type\":\"status\",\"state\":\"error\",\"reason\":\"fail_start\"}");
        error_json(err, "start_failed", "fail_start is in the config");
        return PB_ERROR;
    }
    inst->running = 1;
    emit(inst, "{\"type\":\"status\",\"state\":\"connected\",\"number\":\"+15550001000\","
               "\"display_name\":\"Hello C\"}");
    emit(inst, "{\"type\":\"inbound\",\"external_chat_id\":\"hello-chat-1\","
               "\"external_message_id\":\"hello-1\",\"sender\":{\"phone\":\"+15550002000\","
               "\"name\":\"C Client\"},\"text\":\"hello from C\",\"attachments\":[],"
               "\"sent_at\":\"2026-01-01T00:00:00Z\"}");
    log_info(inst, "hello connector started");
    return PB_OK;
}

static int32_t hello_send(pb_instance *inst, const uint8_t *msg, size_t len, const pb_sink *out) {
    long long message = 0;
    if (!json_int(msg, len, "message", &message)) {
        error_json(out, "invalid_message", "no integer \"message\" in the send payload");
        return PB_ERROR;
    }
    inst->sent++;
    char buf[256];
    snprintf(buf, sizeof buf, "{\"type\":\"sent\",\"external_message_id\":\"hello-out-%lld\"}",
             inst->sent);
    sink_str(out, buf);
    snprintf(buf, sizeof buf,
             "{\"type\":\"receipt\",\"message\":%lld,\"status\":\"delivered\","
             "\"external_message_id\":\"hello-out-%lld\"}",
             message, inst->sent);
    emit(inst, buf);
    return PB_OK;
}

static int32_t hello_status(pb_instance *inst, const pb_sink *out) {
    if (inst->running)
        sink_str(out, "{\"type\":\"status\",\"state\":\"connected\",\"number\":\"+15550001000\","
                      "\"display_name\":\"Hello C\"}");
    else
        sink_str(out, "{\"type\":\"status\",\"state\":\"disconnected\"}");
    return PB_OK;
}

static int32_t hello_stop(pb_instance *inst, const pb_sink *err) {
    (void)err;
    if (inst->running) {
        inst->running = 0;
        emit(inst, "{\"type\":\"status\",\"state\":\"disconnected\",\"reason\":\"stopped\"}");
    }
    return PB_OK;
}

static void hello_destroy(pb_instance *inst) { free(inst); }

static const pb_connector_v1 DESCRIPTOR = {
#if defined(HELLO_REVISION_1_1)
    .struct_size = PB_CONNECTOR_V1_MIN_SIZE,
#else
    .struct_size = sizeof(pb_connector_v1),
#endif
    .abi_version = PB_ABI_VERSION,
    .kind = "hello",
    .version = "1.0.0",
    .create = hello_create,
    .start = hello_start,
    .send = hello_send,
    .status = hello_status,
    .stop = hello_stop,
    .destroy = hello_destroy,
    /* Names, each NUL-terminated, then an empty one (C adds the last NUL). */
    .secret_keys = "api_key\0",
};

PB_EXPORT const pb_connector_v1 *patchbay_connector_v1(uint32_t host_abi_version) {
    return host_abi_version == PB_ABI_VERSION ? &DESCRIPTOR : NULL;
}

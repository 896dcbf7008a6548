/*
 * patchbay_connector.h — the patchbay connector plugin ABI, version 1 (header
 * revision 1.2).
 *
 * This header is the normative description of the boundary between patchbayd (the
 * host) and a connector plugin (a shared library in the daemon's plugin folder). The
 * Rust SDK (crate patchbay-connector-sdk, module `abi`) mirrors it exactly; a plugin
 * written in C, C++, Zig, Go (cgo), ... only needs this file.
 *
 * ---------------------------------------------------------------------------------
 * 1. Versioning
 * ---------------------------------------------------------------------------------
 * - A plugin exports one entry symbol per major ABI version it implements:
 *       const pb_connector_v1 *patchbay_connector_v1(uint32_t host_abi_version);
 *   A future incompatible ABI gets a new symbol (patchbay_connector_v2) and new
 *   structs; a plugin may export several entry symbols and a host picks the newest it
 *   knows.
 * - The host calls the entry once, when it loads the library, passing the ABI version
 *   it speaks (PB_ABI_VERSION). The plugin returns a pointer to a descriptor that stays
 *   valid for the life of the process (a static), or NULL to refuse the host.
 * - Every struct that crosses begins with `uint32_t struct_size; uint32_t abi_version;`.
 *   Within one major version, structs only ever grow at the end, and a NULL function
 *   pointer means "not supported". So a reader checks `abi_version` first, then that
 *   `struct_size` covers every field it is about to touch, and never reads past
 *   `struct_size`:
 *     * the host refuses a descriptor whose abi_version != PB_ABI_VERSION or whose
 *       struct_size < PB_CONNECTOR_V1_MIN_SIZE, and treats fields added later (beyond
 *       struct_size) as NULL;
 *     * a plugin must check pb_host.struct_size the same way before using a host
 *       callback added after version 1.0 of this header: refuse a host smaller than
 *       PB_HOST_V1_MIN_SIZE, and test PB_HOST_HAS(host, field) before reading a later
 *       field (a host built against revision 1.0 gives a shorter struct).
 * - Revisions of this header within ABI version 1 (PB_ABI_VERSION stays 1; old plugins
 *   keep working with new hosts and new plugins with old hosts):
 *     1.0  the original callbacks and descriptor.
 *     1.1  pb_host.flush: wait until emitted events are durably recorded (section 6).
 *     1.2  pb_connector_v1.secret_keys: the config keys that hold credentials
 *          (section 7); inbound "sender.id", the messenger's stable user id; the
 *          inbound bounds (text, attachments, sender fields, PB_MAX_JSON_DEPTH) and
 *          what the host does with an event outside them (section 3).
 * - The host never unloads a library (no dlclose): static data, thread-locals and
 *   code of a plugin stay valid until the process exits.
 *
 * ---------------------------------------------------------------------------------
 * 2. Memory ownership: nothing is freed across the boundary
 * ---------------------------------------------------------------------------------
 * - Inputs (config JSON, message JSON) are borrowed for the duration of the call: the
 *   plugin copies what it wants to keep.
 * - Outputs (results, errors, status) are written by the plugin through a pb_sink that
 *   the host provides for the call. The host copies the bytes into its own memory. A
 *   plugin may call `write` several times; the chunks are concatenated. The sink is
 *   valid only until the call that received it returns: never store it.
 * - The only plugin-owned object the host holds is the opaque pb_instance, released
 *   by the plugin's `destroy`.
 * - Strings in the descriptor (`kind`, `version`, `secret_keys`) are static and owned
 *   by the plugin; the host copies them at load.
 *
 * ---------------------------------------------------------------------------------
 * 3. Payloads
 * ---------------------------------------------------------------------------------
 * Every payload is UTF-8 JSON with an explicit byte length (no NUL terminator is
 * needed or expected), and every JSON value is an object with a "type" field. Readers
 * ignore object fields they do not know, so fields may be added in later revisions;
 * an unknown "type" is an error. Optional fields may be omitted or null.
 *
 * Host -> plugin
 *   create config:  any JSON object; its keys are the connector's own (the daemon
 *                   passes the channel's `config` object verbatim, without "type").
 *   send:           {"type":"send","message":<i64 host message id>,
 *                    "external_chat_id":"...","to":{"phone":"+...","username":"..."},
 *                    "text":"...","attachments":[...]}
 *
 * Plugin -> host (through a sink)
 *   send result:    {"type":"sent","external_message_id":"..."}
 *   status result:  {"type":"status","state":"connecting|connected|disconnected|error",
 *                    "number":"...","display_name":"...","reason":"...",
 *                    "details":{...}}            (details: free-form, for operators)
 *   any error:      {"type":"error","code":"snake_case_code","message":"for people",
 *                    "retryable":true|false}
 *
 * Plugin -> host (through pb_host.emit), events:
 *   {"type":"status","state":"connecting|connected|disconnected|error",
 *    "number":"...","display_name":"...","reason":"..."}
 *   {"type":"inbound","external_chat_id":"...","external_message_id":"...",
 *    "sender":{"id":"...","phone":"+...","username":"...","name":"..."},
 *    "text":"...","attachments":[...],"sent_at":"2026-11-25T10:00:00Z"} (RFC 3339)
 *   {"type":"receipt","message":<i64 host message id>,
 *    "status":"delivered|failed|read","external_message_id":"...","reason":"..."}
 *
 * sender (revision 1.2): every field is optional, but at least one must be set.
 *   "id" is the messenger's own stable user id as a string (Telegram from.id,
 *   WhatsApp wa_id, a gateway's sender id): set it whenever the messenger has one.
 *   The host finds the client's contact by normalised phone, else by id on this
 *   channel, else by username; a sender with only a name is stored as its chat's
 *   contact. Hosts of revision 1.1 ignore "id".
 *
 * Bounds: external ids are 1..256 bytes; a status's number and display_name at most
 * 256 characters, a reason (status or receipt) at most 1024. Inbound (revision 1.2):
 * each sender field at most 256 characters and not blank, text at most
 * PB_MAX_TEXT_BYTES, at most PB_MAX_ATTACHMENTS attachments of at most
 * PB_MAX_ATTACHMENTS_BYTES of JSON together; every event nests arrays and objects at
 * most PB_MAX_JSON_DEPTH deep ({"a":[1]} is 2). What the host does with an event
 * outside them (emit still answers PB_OK; only PB_MAX_PAYLOAD_BYTES is checked there):
 *   - an inbound one (a JSON object with "type":"inbound") is recorded as a dead
 *     inbound_message job with the reason, visible to operators and retryable, and
 *     counts as recorded for flush: acknowledge it, redelivering it cannot help;
 *   - anything else (not JSON, an unknown type, a bad status or receipt) is logged
 *     and dropped;
 *   - a status result outside them is an error of the status call.
 *
 * external_message_id of inbound events must be unique and stable per channel: the
 * host stores each (channel, external_message_id) once, so re-emitting an event after
 * a reconnect is harmless and a reused id loses a message. external_chat_id
 * identifies the conversation (one per client for a 1:1 messenger).
 *
 * ---------------------------------------------------------------------------------
 * 4. Status codes (every int32_t returned by a plugin function or host callback)
 * ---------------------------------------------------------------------------------
 *   PB_OK           success.
 *   PB_ERROR        failure; the sink (if any) received an error JSON object.
 *   PB_PANICKED     the plugin caught a panic / exception / fatal internal error. The
 *                   host marks the instance poisoned: it never calls start, send,
 *                   status or stop on it again, refuses its emits, and calls only
 *                   `destroy` (destroy IS still called, so the plugin can release
 *                   threads, sockets and memory; it must cope with a half-finished
 *                   state). The sink may have received an error JSON describing it.
 *   PB_BUSY         try again later: from emit, the host's bounded queue for this
 *                   instance is full (back off and retry; do not spin); from a
 *                   plugin function, another call on the same instance is running.
 *   PB_UNSUPPORTED  the function or event is not supported.
 *
 * No panic, C++ exception or longjmp may cross the boundary in either direction:
 * plugins catch at every exported function, the host catches in every callback.
 *
 * ---------------------------------------------------------------------------------
 * 5. Lifecycle and threading
 * ---------------------------------------------------------------------------------
 *   load:    entry(PB_ABI_VERSION) once per process.
 *   create:  one instance per channel; several instances of one plugin live at once,
 *            each with its own pb_host. Validates the config; starts nothing.
 *   start:   connect; may spawn the plugin's own threads. Returns once the
 *            connection attempt is under way (report progress with status events).
 *            Called at most once per instance; a restart is a new instance. A start
 *            that returns an error must leave no thread running.
 *   send:    deliver one outbound message; only between a successful start and stop.
 *   status:  current state, any time between create and destroy.
 *   stop:    disconnect, join every thread the instance started; after it returns the
 *            plugin never calls emit for this instance again. PB_BUSY means "not
 *            stopped": the instance stays running and the host asks again later.
 *   destroy: free the instance; called exactly once for every successfully created
 *            instance, also after PB_PANICKED and also without start/stop. After it
 *            returns the plugin must not touch the pb_host or its ctx again. The host
 *            destroys a started instance only after its stop returned something other
 *            than PB_BUSY; one whose stop keeps answering PB_BUSY is never destroyed
 *            (the host leaks it, keeping pb_host valid and refusing its emits).
 * - The host asks `status` every few seconds while an instance runs, and replaces the
 *   instance (a new create and start) when it reports "error" for long (about 15 s),
 *   or a status call does not return in time: report "connecting" while you retry a
 *   passing failure yourself.
 *
 * - The host never calls into one instance from two threads at once, but it may call
 *   different instances concurrently, each call from any host thread (instances must
 *   not be tied to the thread that created them). Calls block the calling host thread;
 *   the host runs them on a worker pool with timeouts, so return promptly (seconds,
 *   not minutes). A call that receives PB_BUSY may be retried.
 * - Each plugin runs its own threads and event loops; no host runtime crosses the
 *   boundary.
 * - pb_host.emit is thread-safe and may be called from any thread the plugin owns,
 *   from the moment `start` is entered until `stop` returns (also from inside start,
 *   send and stop). It copies the event and never blocks. Outside that window, or for
 *   a poisoned instance, it returns PB_ERROR.
 * - pb_host.log may be called from any plugin thread from `create` until `destroy`
 *   returns; it never blocks for long.
 *
 * ---------------------------------------------------------------------------------
 * 6. Durable acknowledgement: pb_host.flush (revision 1.1)
 * ---------------------------------------------------------------------------------
 * PB_OK from emit only means the host has queued the event in memory: if the host
 * process dies right after, the event is gone. A connector that acknowledges messages
 * to its messenger (advances a poll offset, answers an HTTP request with 200, acks a
 * queue delivery) must not do so on emit alone. It calls
 *       int32_t flush(void *ctx, uint32_t timeout_ms);
 * which blocks the calling thread until every event this instance emitted with PB_OK
 * before the call has been durably recorded by the host (an inbound message is
 * on the host's durable job queue, so it survives a crash of the host; a status or receipt is
 * applied; an event the host dropped as malformed counts as recorded too), or until
 * timeout_ms passes. Only then is it safe to acknowledge.
 *   PB_OK     every such event is recorded: acknowledge them now.
 *   PB_BUSY   timed out: the host is behind (back-pressure). The events are still on
 *             their way; call flush again, or leave them unacknowledged.
 *   PB_ERROR  they may never be recorded: the instance is not running, its `stop` has
 *             begun (waiting flushes are woken at once), or the host failed to record
 *             one of this instance's events (from then on every flush of the instance
 *             answers PB_ERROR and the host replaces the instance). Do not acknowledge:
 *             the messenger should deliver the messages again; the host stores each
 *             (channel, external_message_id) once, so the repeat is harmless.
 * Rules:
 * - flush may be called from any plugin thread between `start` and `stop` returning,
 *   also from inside `send`; called from inside `stop` it answers PB_ERROR at once.
 *   Several threads may flush at once. It never changes what emit does: emit still
 *   never blocks.
 * - NULL, or beyond struct_size (PB_HOST_HAS(host, flush) is false): the host is older
 *   than revision 1.1 and offers no durable acknowledgement; acknowledge after emit as
 *   before.
 *
 * ---------------------------------------------------------------------------------
 * 7. Secret config keys: pb_connector_v1.secret_keys (revision 1.2)
 * ---------------------------------------------------------------------------------
 * A connector names the keys of its config object whose values are credentials (a bot
 * token, an HMAC secret, an API key) in `secret_keys`: a static list of NUL-terminated
 * names ended by an empty name, e.g. "token\0" (C adds the final NUL) or
 * "secret\0outbound_secret\0". NULL, an empty list, or a descriptor whose struct_size
 * ends before the field (a plugin built against revision 1.0 or 1.1) declares none.
 * - Names are top-level keys of the config object, 1..=PB_MAX_SECRET_KEY_LEN bytes of
 *   UTF-8 each, at most PB_MAX_SECRET_KEYS of them; nested keys cannot be named, so
 *   keep credentials at the top level (the whole value of a named key is secret,
 *   whatever its JSON type). The host refuses a descriptor whose list breaks these
 *   bounds.
 * - create still receives the real values. The host never shows them: every result
 *   of the daemon that carries a channel's config shows "***" in their place, and the
 *   host replaces each secret string (4 bytes or longer) it finds in the plugin's
 *   error messages, status reasons and details, event reasons and log lines with
 *   "***" before it stores or logs them. Do not rely on that: never echo a secret.
 */
#ifndef PATCHBAY_CONNECTOR_H
#define PATCHBAY_CONNECTOR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes. */
#define PB_ABI_VERSION 1u

/* Status codes. */
#define PB_OK 0
#define PB_ERROR 1
#define PB_PANICKED 2
#define PB_BUSY 3
#define PB_UNSUPPORTED 4

/* Log levels for pb_host.log (unknown values are logged at info). */
#define PB_LOG_ERROR 1
#define PB_LOG_WARN 2
#define PB_LOG_INFO 3
#define PB_LOG_DEBUG 4
#define PB_LOG_TRACE 5

/* The host refuses an emitted event larger than this (emit returns PB_ERROR), and a
 * sink output larger than this is an error of the call that wrote it. */
#define PB_MAX_PAYLOAD_BYTES (1024u * 1024u)

/* Inbound event bounds (revision 1.2, section 3). */
#define PB_MAX_JSON_DEPTH 32u
#define PB_MAX_TEXT_BYTES (64u * 1024u)
#define PB_MAX_ATTACHMENTS 64u
#define PB_MAX_ATTACHMENTS_BYTES (256u * 1024u)
#define PB_MAX_SENDER_FIELD_CHARS 256u

/* `kind` is 1..=PB_MAX_KIND_LEN bytes of [a-z0-9_]; `version` at most
 * PB_MAX_VERSION_LEN bytes of UTF-8 (semver recommended). */
#define PB_MAX_KIND_LEN 64u
#define PB_MAX_VERSION_LEN 64u

/* Bounds of pb_connector_v1.secret_keys (revision 1.2, section 7). */
#define PB_MAX_SECRET_KEY_LEN 64u
#define PB_MAX_SECRET_KEYS 32u

#if defined(_WIN32)
#define PB_EXPORT __declspec(dllexport)
#else
#define PB_EXPORT __attribute__((visibility("default")))
#endif

/* Opaque plugin-owned instance: one per channel. */
typedef struct pb_instance pb_instance;

/* A host-owned output buffer for one call. `write` appends `len` bytes at `ptr` (which
 * need not stay valid after write returns). Thread-safe only for the duration of the
 * call that received the sink; never store a sink. */
typedef struct pb_sink {
    void *ctx;
    void (*write)(void *ctx, const uint8_t *ptr, size_t len);
} pb_sink;

/* Host callbacks for one instance, given to `create`. The struct and `ctx` stay valid
 * (at the same address) until `destroy` returns; the plugin may keep the pointer. */
typedef struct pb_host {
    uint32_t struct_size; /* sizeof(pb_host) as the host knows it */
    uint32_t abi_version; /* PB_ABI_VERSION */
    void *ctx;
    /* Hands one event (JSON, see section 3) to the host. Copies it; never blocks.
     * PB_OK: queued. PB_BUSY: the queue is full, back off and retry (the event was
     * not taken). PB_ERROR: refused for good (not running / stopped / poisoned /
     * too large); do not retry. */
    int32_t (*emit)(void *ctx, const uint8_t *json, size_t len);
    /* Logs one UTF-8 line (no trailing newline needed) at a PB_LOG_* level. */
    void (*log)(void *ctx, int32_t level, const uint8_t *msg, size_t len);
    /* Revision 1.1 (check PB_HOST_HAS(host, flush) first; may be NULL). Blocks until
     * every event emitted before the call is durably recorded by the host, at most
     * timeout_ms. PB_OK: recorded, safe to acknowledge. PB_BUSY: timed out, not yet.
     * PB_ERROR: stopping, not running, or the host lost an event: do not acknowledge.
     * See section 6. */
    int32_t (*flush)(void *ctx, uint32_t timeout_ms);
} pb_host;

/* The pb_host of header revision 1.0 (up to `log`): a plugin refuses a smaller one. */
#define PB_HOST_V1_MIN_SIZE (offsetof(pb_host, log) + sizeof(void (*)(void)))

/* Whether the host struct `h` (a const pb_host *) is long enough to contain `field`;
 * the field itself may still be NULL. */
#define PB_HOST_HAS(h, field)                                                          \
    ((size_t)(h)->struct_size >= offsetof(pb_host, field) + sizeof((h)->field))

/* The descriptor the entry symbol returns. Fields are only ever added at the end.
 * create, start, stop and destroy are required (the host refuses a NULL one); send and
 * status may be NULL (the host then answers "unsupported" without calling). */
typedef struct pb_connector_v1 {
    uint32_t struct_size; /* sizeof(pb_connector_v1) as the plugin knows it */
    uint32_t abi_version; /* PB_ABI_VERSION */
    const char *kind;     /* e.g. "loopback": static, NUL-terminated, [a-z0-9_]+ */
    const char *version;  /* the plugin's own version, e.g. "1.2.0": static */

    /* Validates `config_json` and creates an instance; writes it to *out on PB_OK.
     * `host` stays valid until destroy(*out) returns. On any other status, *out is
     * untouched, `host` is invalid once create returns (keep nothing of it), and `err`
     * received an error JSON (code "invalid_config" for a bad config). */
    int32_t (*create)(const pb_host *host, const uint8_t *config_json, size_t config_len,
                      pb_instance **out, const pb_sink *err);
    /* Starts connecting (see section 5). */
    int32_t (*start)(pb_instance *inst, const pb_sink *err);
    /* Sends one message; `out` receives {"type":"sent",...} on PB_OK or the error JSON
     * on PB_ERROR. NULL: the connector cannot send. */
    int32_t (*send)(pb_instance *inst, const uint8_t *msg_json, size_t msg_len,
                    const pb_sink *out);
    /* Writes {"type":"status",...} to `out`. NULL: not supported. */
    int32_t (*status)(pb_instance *inst, const pb_sink *out);
    /* Disconnects and joins the instance's threads; no emit after it returns. */
    int32_t (*stop)(pb_instance *inst, const pb_sink *err);
    /* Frees the instance. Called exactly once per created instance, last. */
    void (*destroy)(pb_instance *inst);
    /* Revision 1.2: the config keys that hold credentials, "name\0name\0\0"; NULL for
     * none. Static. See section 7. */
    const char *secret_keys;
} pb_connector_v1;

/* The size of the version-1 descriptor (revision 1.0, up to `destroy`): the host
 * refuses anything smaller, and reads a later field only where struct_size covers it. */
#define PB_CONNECTOR_V1_MIN_SIZE (offsetof(pb_connector_v1, destroy) + sizeof(void (*)(void)))

/* The smallest struct_size that includes `secret_keys` (revision 1.2). */
#define PB_CONNECTOR_SECRET_KEYS_MIN_SIZE                                              \
    (offsetof(pb_connector_v1, secret_keys) + sizeof(const char *))

/* The entry symbol. Return NULL to refuse a host whose host_abi_version you cannot
 * serve. Called once per process; return a pointer to a static descriptor. */
PB_EXPORT const pb_connector_v1 *patchbay_connector_v1(uint32_t host_abi_version);

#ifdef __cplusplus
}
#endif

#endif /* PATCHBAY_CONNECTOR_H */

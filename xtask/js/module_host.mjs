// A proxy-wasm host in Node.js's V8 whose host calls cost next to nothing: it drives a build of
// the filter module (capture, no-op or read floor) through the callbacks Envoy makes for an
// HTTP/1.1 GET answered with 1 KiB, and answers its host calls from constants. Run by
// `cargo xtask bench --parts filter`: the module's own cost inside V8 (the SDK's dispatch, the
// filter, its allocations), apart from what Envoy's side of each host call costs.
//
//   node module_host.mjs MODULE.wasm EXCHANGES EVICT_BYTES
//
// Prints one JSON object. Fails (exit 1) when the module logs a warning, a capture is dropped,
// or the module makes a host call this host does not answer.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';

const [program, exchangesArg, evictArg] = process.argv.slice(2);
const EXCHANGES = Number(exchangesArg), EVICT = Number(evictArg);
if (!program || !(EXCHANGES > 0) || !(EVICT >= 0)) {
  throw new Error('usage: node module_host.mjs MODULE.wasm EXCHANGES EVICT_BYTES');
}

// proxy-wasm ABI 0.2.1 numbering.
const OK = 0, NOT_FOUND = 1;
const MAP_REQUEST_HEADERS = 0, MAP_RESPONSE_HEADERS = 2, MAP_GRPC_INITIAL_METADATA = 4;
const BUFFER_RESPONSE_BODY = 1, BUFFER_GRPC_RECEIVE = 5, BUFFER_PLUGIN_CONFIGURATION = 7;
const LOG_WARN = 3;
const ROOT = 1, STREAM_TOKEN = 7;

const encoder = new TextEncoder(), decoder = new TextDecoder();
const bytes = (text) => encoder.encode(text);

/// Envoy's serialization of a header map: count, (name length, value length)s, then each name
/// and value followed by a NUL.
function pairs(list) {
  const encoded = list.map(([name, value]) => [bytes(name), bytes(value)]);
  let size = 4 + 8 * encoded.length;
  for (const [name, value] of encoded) size += name.length + value.length + 2;
  const out = new Uint8Array(size), view = new DataView(out.buffer);
  view.setUint32(0, encoded.length, true);
  let at = 4;
  for (const [name, value] of encoded) {
    view.setUint32(at, name.length, true);
    view.setUint32(at + 4, value.length, true);
    at += 8;
  }
  for (const [name, value] of encoded) {
    out.set(name, at);
    at += name.length + 1;
    out.set(value, at);
    at += value.length + 1;
  }
  return out;
}

// What the bench's upstream and load generator exchange (see `exchange_cost.rs`).
const requestHeaders = pairs([[':authority', '127.0.0.1:10000'], [':path', '/'], [':method', 'GET'], [':scheme', 'http'],
  ['x-forwarded-proto', 'http'], ['x-request-id', '0b6c5a7e-1f1e-4a5b-9d3c-1e2f3a4b5c6d']]);
const responseHeaders = pairs([[':status', '200'], ['content-length', '1024'], ['content-type', 'text/plain'],
  ['date', 'Sat, 21 Nov 2026 21:00:00 GMT'], ['server', 'envoy'], ['x-envoy-upstream-service-time', '0']]);
const responseBody = new Uint8Array(1024).fill(0x78);
const configuration = bytes('{"cluster":"packet_inspector_aggregator","role":"consumer","flushIntervalMs":100}');
const streamAccepted = pairs([[':status', '200'], ['content-type', 'application/grpc']]);
const noHeaders = pairs([]);
const connectionId = new Uint8Array(8), connectionIdView = new DataView(connectionId.buffer);
// Properties by path (segments joined by NUL, as the ABI passes them).
const properties = new Map([
  ['connection_id', connectionId],
  ['upstream\0address', bytes('127.0.0.1:9080')],
  ['source\0address', bytes('127.0.0.1:40000')],
  ['destination\0address', bytes('127.0.0.1:10000')],
  ['request\0protocol', bytes('HTTP/1.1')],
  ['xds\0node\0metadata\0NAME', bytes('bench-client-0')],
  ['xds\0node\0metadata\0NAMESPACE', bytes('bench')],
  ['xds\0node\0metadata\0WORKLOAD_NAME', bytes('bench-client')],
]);
// The per-request paths, told apart without decoding them: by length and first byte.
const perRequest = new Map([...properties].filter(([path]) => path === 'connection_id' || path === 'upstream\0address')
  .map(([path, value]) => [path.length * 256 + path.charCodeAt(0), value]));

let exports, memory, viewsOf = null, memoryBytes, memoryView;
/// Views of the module's memory, made again when it grows.
function views() {
  if (viewsOf !== memory.buffer) {
    viewsOf = memory.buffer;
    memoryBytes = new Uint8Array(viewsOf);
    memoryView = new DataView(viewsOf);
  }
}
const text = (at, length) => {
  views();
  return decoder.decode(memoryBytes.subarray(at, at + length));
};
/// Hands `value` to the module as Envoy does: in memory the module allocates for it.
function give(value, pointerAt, lengthAt) {
  const at = value.length > 0 ? exports.proxy_on_memory_allocate(value.length) : 0;
  views();
  memoryBytes.set(value, at);
  memoryView.setUint32(pointerAt, at, true);
  memoryView.setUint32(lengthAt, value.length, true);
  return OK;
}

let now = 1_700_000_000_000_000_000n, ack = new Uint8Array(0);
let batches = 0, bytesSent = 0, warnings = [];
const metricNames = [], metrics = [];
const host = {
  proxy_log(level, at, length) {
    if (level >= LOG_WARN) warnings.push(text(at, length));
    return OK;
  },
  proxy_get_property(at, length, pointerAt, lengthAt) {
    views();
    const value = perRequest.get(length * 256 + memoryBytes[at]) ?? properties.get(text(at, length));
    return value ? give(value, pointerAt, lengthAt) : NOT_FOUND;
  },
  proxy_get_header_map_pairs(map, pointerAt, lengthAt) {
    switch (map) {
      case MAP_REQUEST_HEADERS: return give(requestHeaders, pointerAt, lengthAt);
      case MAP_RESPONSE_HEADERS: return give(responseHeaders, pointerAt, lengthAt);
      case MAP_GRPC_INITIAL_METADATA: return give(streamAccepted, pointerAt, lengthAt);
      default: return give(noHeaders, pointerAt, lengthAt);
    }
  },
  proxy_get_buffer_bytes(buffer, start, max, pointerAt, lengthAt) {
    const value = buffer === BUFFER_RESPONSE_BODY ? responseBody
      : buffer === BUFFER_GRPC_RECEIVE ? ack
        : buffer === BUFFER_PLUGIN_CONFIGURATION ? configuration : null;
    if (!value) return NOT_FOUND;
    return give(start === 0 && max >= value.length ? value : value.subarray(start, start + max), pointerAt, lengthAt);
  },
  proxy_get_current_time_nanoseconds(at) {
    views();
    memoryView.setBigUint64(at, now, true);
    return OK;
  },
  proxy_set_tick_period_milliseconds: () => OK,
  proxy_define_metric(type, at, length, idAt) {
    metricNames.push(text(at, length));
    metrics.push(0n);
    views();
    memoryView.setUint32(idAt, metrics.length - 1, true);
    return OK;
  },
  proxy_increment_metric(id, delta) {
    metrics[id] += delta;
    return OK;
  },
  proxy_grpc_stream(...args) {
    views();
    memoryView.setUint32(args[8], STREAM_TOKEN, true);
    return OK;
  },
  proxy_grpc_send(token, at, length) {
    batches += 1;
    bytesSent += length;
    return OK;
  },
  proxy_set_effective_context: () => OK,
};

const module = await WebAssembly.compile(await readFile(program));
const env = {};
for (const { module: from, name } of WebAssembly.Module.imports(module)) {
  if (from === 'env') env[name] = host[name] ?? (() => { throw new Error(`host call ${name}: not answered here`); });
}
const wasi = new WASI({ version: 'preview1', args: [], env: {}, preopens: {} });
const instance = await WebAssembly.instantiate(module, { wasi_snapshot_preview1: wasi.wasiImport, env });
exports = instance.exports;
memory = exports.memory;
wasi.initialize(instance);

exports.proxy_on_context_create(ROOT, 0);
if (!exports.proxy_on_vm_start(ROOT, 0) || !exports.proxy_on_configure(ROOT, configuration.length)) {
  throw new Error(`the module refused its configuration: ${warnings.join('; ')}`);
}
// The aggregator accepts the stream (the no-op builds never open one).
exports.proxy_on_grpc_receive_initial_metadata(ROOT, STREAM_TOKEN, 2);

const evicted = new Uint8Array(Math.max(EVICT, 1));
/// Writes one byte per cache line: what the CPU's caches held before is gone.
function evict() {
  for (let i = 0; i < EVICT; i += 64) evicted[i] += 1;
}

/// One exchange as Envoy calls the filter for it, then the aggregator's acks.
let nextContext = ROOT + 1, acked = 0, exchangesRun = 0;
const TICK_EVERY = 385; // 100 ms at 3,850 requests/s, the bench's open-loop load
function exchange() {
  const context = nextContext++;
  exchangesRun += 1;
  connectionIdView.setBigUint64(0, BigInt(exchangesRun % 50 + 1), true);
  now += 260_000n;
  exports.proxy_on_context_create(context, ROOT);
  exports.proxy_on_request_headers(context, 6, 1);
  exports.proxy_on_response_headers(context, 6, 0);
  exports.proxy_on_response_body(context, responseBody.length, 1);
  exports.proxy_on_log(context);
  exports.proxy_on_done(context);
  exports.proxy_on_delete(context);
  if (exchangesRun % TICK_EVERY === 0) exports.proxy_on_tick(ROOT);
  while (acked < batches) {
    acked += 1;
    const varint = [];
    for (let v = acked; ; v = Math.floor(v / 128)) {
      if (v < 128) { varint.push(v); break; }
      varint.push((v % 128) | 128);
    }
    ack = Uint8Array.from([0x08, ...varint]); // BatchAck { sequence }
    exports.proxy_on_grpc_receive(ROOT, STREAM_TOKEN, ack.length);
  }
}

/// Nanoseconds per exchange; each timed on its own, less what reading the clock twice costs.
function measure(count) {
  let total = 0n, clock = 0n;
  for (let n = 0; n < count; n++) {
    evict();
    let started = process.hrtime.bigint();
    clock += process.hrtime.bigint() - started;
    evict();
    started = process.hrtime.bigint();
    exchange();
    total += process.hrtime.bigint() - started;
  }
  return Number(total - clock) / count;
}

measure(Math.max(1, Math.floor(EXCHANGES / 5)));
const bytesBefore = bytesSent;
const nanoseconds = measure(EXCHANGES);
exports.proxy_on_tick(ROOT);
const counter = (name) => Number(metrics[metricNames.indexOf(`packet_inspector.${name}`)] ?? 0n);
const captured = metricNames.length > 0;
if (warnings.length > 0) throw new Error(`the module warned: ${warnings.join('; ')}`);
if (captured && (counter('captures_started') !== exchangesRun || counter('captures_dropped') !== 0)) {
  throw new Error(`captures started ${counter('captures_started')} of ${exchangesRun}, dropped ${counter('captures_dropped')}`);
}
console.log(JSON.stringify({
  exchanges: EXCHANGES,
  evicted_bytes_before_each: EVICT,
  nanoseconds_per_exchange: nanoseconds,
  bytes_sent_per_exchange: (bytesSent - bytesBefore) / EXCHANGES,
}));

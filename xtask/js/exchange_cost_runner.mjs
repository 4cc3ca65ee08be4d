// Runs the `wasm32-wasip1` build of `filter/examples/exchange_cost.rs` in Node.js's V8:
//
//   node exchange_cost_runner.mjs exchange_cost.wasm [ARGS...]
//
// The example links the filter crate, so its module also imports the proxy-wasm host
// functions, which it never calls: they are given as functions that throw. `wasi.start` wants a
// command module; this one also exports `_initialize` (it is built as the filter is), so it is
// handed only what `start` needs.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
const [program, ...args] = process.argv.slice(2);
const wasi = new WASI({ version: 'preview1', args: [program, ...args], env: {}, preopens: {} });
const module = await WebAssembly.compile(await readFile(program));
const env = {};
for (const { module: from, name } of WebAssembly.Module.imports(module)) {
  if (from === 'env') env[name] = () => { throw new Error(`host call ${name} in a host-free program`); };
}
const instance = await WebAssembly.instantiate(module, { wasi_snapshot_preview1: wasi.wasiImport, env });
wasi.start({ exports: { memory: instance.exports.memory, _start: instance.exports._start } });

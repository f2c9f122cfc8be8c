// The page's side of the engine (web/src/engine-client.ts) against a stand-in worker: which
// state each report moves it to, when a worker is replaced, and what happens to the questions
// a replaced worker never answered.
import { test } from "node:test";
import assert from "node:assert/strict";
import { build } from "esbuild";

const bundle = await build({
  entryPoints: ["web/src/engine-client.ts"],
  bundle: true,
  format: "esm",
  write: false,
  logLevel: "warning",
  // The worker's script URL is resolved against the page's; a data: module has none.
  define: { "import.meta.url": '"https://kiln.test/"' },
});
const { EngineClient } = await import(`data:text/javascript;base64,${Buffer.from(bundle.outputFiles[0].text).toString("base64")}`);

/** Stand-in workers: what the client posted to each, and whether it was terminated. */
const workers = [];
globalThis.Worker = class {
  constructor(url) {
    this.url = String(url);
    this.posted = [];
    this.terminated = false;
    workers.push(this);
  }
  postMessage(message) {
    this.posted.push(message);
  }
  terminate() {
    this.terminated = true;
  }
  /** The worker reports `message` to the page. */
  report(message) {
    this.onmessage({ data: message });
  }
};

const A = { base: "https://host/a", precision: "q8", backend: "webgpu" };
const B = { base: "https://host/b", precision: "q8", backend: "webgpu" };
const INFO = { default_size: 64, size_multiple: 8, precision: "q8" };
const job = (ref, seed = 1) => ({ settings: { seed }, ref, request: { mode: "txt2img", prompt: "a cat", seed } });

/** A client showing `shown`, and the reports it made, by name. */
function client(shown = A) {
  const reports = [];
  const record = (name) => (...args) => reports.push([name, ...args]);
  const events = Object.fromEntries(["download", "uploading", "loaded", "started", "step", "image", "cancelled", "failed", "pngInfo"].map((n) => [n, record(n)]));
  workers.length = 0;
  return { engine: new EngineClient(events, () => shown), reports };
}

test("a load ends idle with the model's info; another model gets a fresh worker", () => {
  const { engine, reports } = client();
  assert.equal(engine.state.kind, "stopped");
  engine.load(A);
  assert.equal(engine.state.kind, "loading");
  assert.equal(workers[0].url, "https://kiln.test/worker.js");
  assert.deepEqual(workers[0].posted, [{ type: "load", ...A }]);
  workers[0].report({ type: "loaded", base: A.base, info: INFO });
  assert.deepEqual(engine.state, { kind: "idle", model: "https://host/a#q8", info: INFO });
  assert.deepEqual(reports, [["loaded", "https://host/a#q8", INFO]]);
  assert.equal(engine.infoFor(A), INFO);
  engine.load(B);
  assert.ok(workers[0].terminated);
  assert.equal(workers.length, 2);
  assert.equal(engine.infoFor(A), null);
  assert.deepEqual(engine.state, { kind: "loading", model: "https://host/b#q8" });
});

test("a job sent while its model loads runs after it, keeps the info and ends idle", () => {
  const { engine, reports } = client();
  engine.load(A);
  const sent = job(A);
  engine.generate(sent, null);
  assert.equal(workers.length, 1, "the same model keeps its worker");
  assert.equal(engine.state.kind, "generating");
  assert.equal(engine.busy, true);
  assert.throws(() => engine.generate(job(A, 2), null), /already running/);
  workers[0].report({ type: "loaded", base: A.base, info: INFO });
  assert.equal(engine.state.kind, "generating", "the load was the job's");
  assert.equal(engine.state.info, INFO);
  const latents = { shape: [1, 1, 1, 2], values: [0.5, -0.5], scaling_factor: 0.18215 };
  workers[0].report({ type: "image", png: new Uint8Array([1]), latents });
  assert.deepEqual(engine.state, { kind: "idle", model: "https://host/a#q8", info: INFO });
  const [name, done, png, kept, seconds] = reports.at(-1);
  assert.deepEqual([name, done, png, kept], ["image", sent, new Uint8Array([1]), latents]);
  assert.ok(seconds >= 0);
});

test("a refused job or a cancel keeps the worker and its model", () => {
  const { engine, reports } = client();
  engine.load(A);
  workers[0].report({ type: "loaded", base: A.base, info: INFO });
  engine.generate(job(A), null);
  workers[0].report({ type: "error", kind: "settings", message: "width 65 is not a multiple of 8" });
  assert.deepEqual(engine.state, { kind: "idle", model: "https://host/a#q8", info: INFO });
  assert.deepEqual(reports.at(-1), ["failed", "settings", "width 65 is not a multiple of 8"]);
  engine.generate(job(A), null);
  engine.cancel();
  assert.deepEqual(workers[0].posted.at(-1), { type: "cancel" });
  workers[0].report({ type: "cancelled" });
  assert.equal(engine.state.kind, "idle");
  assert.equal(engine.infoFor(A), INFO);
  assert.equal(workers.length, 1);
});

test("a crash stops the worker and fails its unanswered questions; the next question starts a fresh one", async () => {
  const { engine, reports } = client(B);
  engine.generate(job(A), null);
  const status = engine.askCache("status", A);
  const asked = workers[0].posted.at(-1);
  assert.deepEqual(asked, { type: "cache", id: asked.id, question: "status", base: A.base, precision: A.precision });
  workers[0].report({ type: "error", kind: "crash", message: "unreachable" });
  assert.equal(engine.state.kind, "stopped");
  assert.ok(workers[0].terminated);
  assert.deepEqual(reports.at(-1), ["failed", "crash", "unreachable"]);
  await assert.rejects(status, /the worker was replaced/);
  const list = engine.askGallery({ op: "list" });
  assert.equal(workers.length, 2);
  assert.deepEqual(engine.state, { kind: "idle", model: "https://host/b#q8", info: null }, "started for the model shown");
  const { id } = workers[1].posted.at(-1);
  workers[1].report({ type: "gallery", id, answer: [] });
  assert.deepEqual(await list, []);
  const other = engine.askGallery({ op: "clear" });
  workers[1].report({ type: "gallery", id: workers[1].posted.at(-1).id, problem: "quota exceeded" });
  await assert.rejects(other, /quota exceeded/);
});

// The page's side of the engine: the worker that holds one model, what it is doing (one
// explicit state, changed only here), and the questions the page asks it about the stores it
// alone opens. main.ts renders what this reports and never talks to the worker itself.
import type { CacheAnswers, DownloadProgress, ErrorKind, FromWorker, GalleryAnswers, GalleryAsk, Latents, ModelInfo, ModelRef, Preview, Started, ToWorker } from "./protocol";
import type { Job } from "./queue";

/**
 * - stopped: no worker (none yet, or replaced after a crash or a lost device).
 * - idle: the worker waits; `info` is the model it holds, null when none is loaded.
 * - loading: it is downloading the model or moving it to the GPU, for no job.
 * - generating: it runs `job` (loading the model first when it must).
 */
export type EngineState =
  | { kind: "stopped" }
  | { kind: "idle"; model: string; info: ModelInfo | null }
  | { kind: "loading"; model: string }
  | { kind: "generating"; model: string; info: ModelInfo | null; job: Job; startedAt: number };

/** What the engine reports, for the page to show. Each follows the state change it causes. */
export interface EngineEvents {
  download(progress: DownloadProgress): void;
  uploading(done: number, total: number): void;
  /** The model is on the GPU; a load for no job is over. */
  loaded(model: string, info: ModelInfo): void;
  started(started: Started): void;
  step(done: number, total: number, preview?: Preview): void;
  /** `job` made `png` in `seconds`. */
  /** A finished job's PNG and the latents it was decoded from. */
  image(job: Job, png: Uint8Array, latents: Latents, seconds: number): void;
  cancelled(): void;
  /** A job or load failed; after a crash or a lost device the worker is gone. */
  failed(kind: ErrorKind, message: string): void;
  pngInfo(answer: Extract<FromWorker, { type: "png-info" }>): void;
}

/** One model in one precision, on whichever backend. */
export type ModelKeyed = Pick<ModelRef, "base" | "precision">;

/** One model in one precision: what a worker holds. */
export function modelKey(ref: ModelKeyed): string {
  return `${ref.base}#${ref.precision}`;
}

type Question = Extract<ToWorker, { type: "cache" | "gallery" }>;

export class EngineClient {
  private current: EngineState = { kind: "stopped" };
  private worker: Worker | null = null;
  /** Questions asked of this worker, by id, until it answers or is replaced. */
  private questions = new Map<number, { resolve: (answer: never) => void; reject: (e: Error) => void }>();
  private lastQuestion = 0;

  /** `shown` is the model the page shows: a question with no worker to answer starts one for it. */
  constructor(
    private readonly events: EngineEvents,
    private readonly shown: () => ModelKeyed,
  ) {}

  get state(): EngineState {
    return this.current;
  }

  /** Loading or generating. */
  get busy(): boolean {
    return this.current.kind === "loading" || this.current.kind === "generating";
  }

  /** What the worker reported of `ref`'s model, when it holds that model. */
  infoFor(ref: ModelKeyed): ModelInfo | null {
    const s = this.current;
    return (s.kind === "idle" || s.kind === "generating") && s.model === modelKey(ref) ? s.info : null;
  }

  /** Loads `ref`'s model for no job yet; only while idle or stopped. */
  load(ref: ModelRef): void {
    if (this.busy) return;
    const model = modelKey(ref);
    this.post(model, { type: "load", ...ref });
    this.current = { kind: "loading", model };
  }

  /** Runs `job`, after a load in progress if there is one; not while another job runs. */
  generate(job: Job, preview: Extract<ToWorker, { type: "generate" }>["preview"]): void {
    if (this.current.kind === "generating") throw new Error("a job is already running");
    const model = modelKey(job.ref);
    this.post(model, { type: "generate", ...job.ref, request: job.request, preview, loras: job.settings.loras });
    const info = this.infoFor(job.ref);
    this.current = { kind: "generating", model, info, job, startedAt: performance.now() };
  }

  /** Stops the running job (or load) within a step; "cancelled" follows. */
  cancel(): void {
    if (this.busy) this.worker?.postMessage({ type: "cancel" } satisfies ToWorker);
  }

  /** Asks about `ref`'s model in the cache. */
  askCache<Q extends keyof CacheAnswers>(question: Q, ref: ModelKeyed): Promise<CacheAnswers[Q]> {
    return this.ask((id) => ({ type: "cache", id, question, base: ref.base, precision: ref.precision }));
  }

  askGallery<A extends GalleryAsk>(ask: A): Promise<GalleryAnswers[A["op"]]> {
    return this.ask((id) => ({ type: "gallery", id, ask }));
  }

  /** Asks for the settings in a PNG's parameters text; answered through `events.pngInfo`. */
  readPngInfo(png: Uint8Array, name: string): void {
    this.answering().postMessage({ type: "png-info", png, name } satisfies ToWorker, [png.buffer]);
  }

  /** Asks the worker, the only thread that opens the stores, the question `message(id)`. */
  private ask<T>(message: (id: number) => Question): Promise<T> {
    const id = ++this.lastQuestion;
    // Start the worker (if it must) before the question is filed: starting one drops the last one's.
    const worker = this.answering();
    return new Promise((resolve, reject) => {
      this.questions.set(id, { resolve: resolve as (answer: never) => void, reject });
      worker.postMessage(message(id));
    });
  }

  /** Any worker answers questions about any model; with none, one starts for the model shown. */
  private answering(): Worker {
    return this.worker ?? this.workerFor(modelKey(this.shown()));
  }

  private post(model: string, msg: Extract<ToWorker, { type: "load" | "generate" }>): void {
    this.workerFor(model).postMessage(msg);
  }

  /** The worker for `model`: one model on the GPU at a time, so another gets a fresh worker (and device). */
  private workerFor(model: string): Worker {
    if (this.current.kind !== "stopped" && this.current.model !== model) this.stop();
    if (!this.worker) {
      const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
      worker.onmessage = (e: MessageEvent<FromWorker>) => this.receive(e.data);
      worker.onerror = (e) => {
        e.preventDefault();
        this.fail("crash", e.message || "the worker could not start");
      };
      this.worker = worker;
      this.current = { kind: "idle", model, info: null };
    }
    return this.worker;
  }

  private stop(): void {
    this.worker?.terminate();
    this.worker = null;
    this.current = { kind: "stopped" };
    for (const { reject } of this.questions.values()) reject(new Error("the worker was replaced"));
    this.questions.clear();
  }

  /** The job or load is over; the worker keeps the model it reported, if any. */
  private settle(): void {
    const s = this.current;
    if (s.kind === "generating") this.current = { kind: "idle", model: s.model, info: s.info };
    else if (s.kind === "loading") this.current = { kind: "idle", model: s.model, info: null };
  }

  private fail(kind: ErrorKind, message: string): void {
    // After a panic or a lost device the wasm instance is unusable: the next call starts a fresh worker.
    if (kind === "crash" || kind === "device-lost") this.stop();
    else this.settle();
    this.events.failed(kind, message);
  }

  private receive(msg: FromWorker): void {
    const s = this.current;
    switch (msg.type) {
      case "download":
        return this.events.download(msg.progress);
      case "uploading":
        return this.events.uploading(msg.done, msg.total);
      case "loaded":
        if (s.kind === "generating") this.current = { ...s, info: msg.info };
        else if (s.kind !== "stopped") this.current = { kind: "idle", model: s.model, info: msg.info };
        if (s.kind !== "stopped") this.events.loaded(s.model, msg.info);
        return;
      case "started":
        return this.events.started(msg.started);
      case "step":
        return this.events.step(msg.done, msg.total, msg.preview);
      case "image":
        if (s.kind !== "generating") return;
        this.settle();
        return this.events.image(s.job, msg.png, msg.latents, (performance.now() - s.startedAt) / 1000);
      case "cancelled":
        this.settle();
        return this.events.cancelled();
      case "png-info":
        return this.events.pngInfo(msg);
      case "cache":
      case "gallery": {
        const asked = this.questions.get(msg.id);
        this.questions.delete(msg.id);
        if (msg.problem !== undefined) asked?.reject(new Error(msg.problem));
        else asked?.resolve(msg.answer as never);
        return;
      }
      case "error":
        return this.fail(msg.kind, msg.message);
    }
  }
}

// Generations waiting their turn. Generate while one runs adds to the queue, and a batch adds
// one job per seed; the list shows the running job and every waiting one with a button that
// removes it, and progress counts the whole queue ("image 2 of 4") until it runs empty.
import { listItem } from "./dom";
import type { GenerateRequest, ModelRef } from "./protocol";
import { caption, type Settings } from "./settings";

export interface Job {
  /** This image's own settings (its seed, a count of 1): what the gallery keeps with it. */
  settings: Settings;
  ref: ModelRef;
  request: GenerateRequest;
}

export class Queue {
  /** The job the worker runs now. */
  running: Job | null = null;
  private waiting: Job[] = [];
  /** Jobs ended since the queue was last empty. */
  private ended = 0;

  constructor(
    private readonly list: HTMLOListElement,
    private readonly cancelAll: HTMLButtonElement,
  ) {}

  add(jobs: Job[]): void {
    this.waiting.push(...jobs);
    this.render();
  }

  /** Makes the next waiting job the running one; null when none waits. */
  start(): Job | null {
    this.running = this.waiting.shift() ?? null;
    this.render();
    return this.running;
  }

  /** The running job ended: its image came, it was cancelled, or it failed. */
  end(): void {
    if (!this.running) return;
    this.running = null;
    this.ended = this.waiting.length > 0 ? this.ended + 1 : 0;
    this.render();
  }

  /** Drops every waiting job. */
  clear(): void {
    this.waiting = [];
    this.render();
  }

  /** "image 2 of 4" while more than one image is in the queue's current run; else "". */
  position(): string {
    const total = this.ended + (this.running ? 1 : 0) + this.waiting.length;
    return total > 1 ? `image ${this.ended + 1} of ${total}` : "";
  }

  private render(): void {
    const now = this.running ? [listItem(`Now: ${caption(this.running.settings)}`)] : [];
    const waiting = this.waiting.map((job) => {
      const li = listItem(`Waiting: ${caption(job.settings)} `);
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove from the queue: ${caption(job.settings)}`);
      remove.addEventListener("click", () => {
        this.waiting = this.waiting.filter((j) => j !== job);
        this.render();
      });
      li.append(remove);
      return li;
    });
    this.list.replaceChildren(...now, ...waiting);
    this.list.hidden = now.length + waiting.length < 2;
    this.cancelAll.disabled = waiting.length === 0;
  }
}


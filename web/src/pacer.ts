// How often a generation's live preview is drawn: the approximate one costs a readback of the
// latents and is drawn every step; the sharp one (the tiny autoencoder) may cost more than a
// step on a slow GPU, so it is paced to a share of the steps' time.
/**
 * The share of the steps' time the sharp preview may add: on a GPU where decoding takes longer
 * than that, it is shown every few steps (the first right away) and the last one stays.
 */
export const SHARP_PREVIEW_BUDGET = 0.05;

/** When to show the live preview: every step, or for the sharp one within its budget. */
export class PreviewPacer {
  private plain = { ms: 0, steps: 0 };
  private sharp = { ms: 0, steps: 0 };

  /** `on`: the preview is shown; `budgeted`: it is the sharp one. */
  constructor(private readonly on: boolean, private readonly budgeted: boolean) {}

  /** Whether the next step draws the preview. */
  wanted(): boolean {
    if (!this.on || !this.budgeted) return this.on;
    // The first preview right away, then one step without, to learn what the preview adds.
    if (this.sharp.steps === 0) return true;
    if (this.plain.steps === 0) return false;
    const added = this.sharp.ms - this.sharp.steps * (this.plain.ms / this.plain.steps);
    return added <= SHARP_PREVIEW_BUDGET * (this.plain.ms + this.sharp.ms);
  }

  /** Records a step's time, `previewed` or not. */
  took(ms: number, previewed: boolean): void {
    const kind = previewed && this.budgeted ? this.sharp : this.plain;
    kind.ms += ms;
    kind.steps++;
  }
}

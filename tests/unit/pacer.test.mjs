// The sharp preview's pacing: drawn every step while it adds little, spaced so that it adds
// about SHARP_PREVIEW_BUDGET of the steps' time when it costs more; the approximate preview
// is drawn every step, and none when the preview is off.
import { test } from "node:test";
import assert from "node:assert/strict";
import { build } from "esbuild";

const bundle = await build({ entryPoints: ["web/src/pacer.ts"], bundle: true, format: "esm", write: false, logLevel: "warning" });
const { PreviewPacer, SHARP_PREVIEW_BUDGET } = await import(`data:text/javascript;base64,${Buffer.from(bundle.outputFiles[0].text).toString("base64")}`);

/** Runs `steps` steps of `stepMs`, a drawn preview adding `previewMs`; returns which drew it and the share of time it added. */
function simulate({ on = true, sharp = true, steps = 200, stepMs = 100, previewMs }) {
  const pacer = new PreviewPacer(on, sharp);
  const drawn = [];
  for (let i = 0; i < steps; i++) {
    const wanted = pacer.wanted();
    drawn.push(wanted);
    pacer.took(stepMs + (wanted ? previewMs : 0), wanted);
  }
  const previews = drawn.filter(Boolean).length;
  return { drawn, previews, added: (previews * previewMs) / (steps * stepMs + previews * previewMs) };
}

test("a cheap sharp preview is drawn on every step but the one that measures it", () => {
  const { drawn } = simulate({ previewMs: 2 });
  assert.deepEqual(drawn.slice(0, 3), [true, false, true]);
  assert.ok(drawn.slice(2).every(Boolean));
});

test("a costly sharp preview is spaced out to its budget, the first one at once", () => {
  for (const previewMs of [20, 50, 100, 400]) {
    const { drawn, added } = simulate({ previewMs });
    assert.equal(drawn[0], true, `${previewMs} ms: the first step shows the preview`);
    // The first preview is drawn whatever it costs; the rest keep to the budget.
    const most = SHARP_PREVIEW_BUDGET + previewMs / (200 * 100);
    assert.ok(added <= most && added >= SHARP_PREVIEW_BUDGET * 0.6, `${previewMs} ms: adds ${(100 * added).toFixed(1)}% of the time`);
  }
});

test("the approximate preview is drawn every step, and none when the preview is off", () => {
  assert.ok(simulate({ sharp: false, previewMs: 50 }).drawn.every(Boolean));
  assert.equal(simulate({ on: false, previewMs: 1 }).previews, 0);
  assert.equal(simulate({ on: false, sharp: true, previewMs: 1 }).previews, 0);
});

// Generated share links (fast-check) against the page's query-string reader: whatever a link
// holds, `fromQuery` gives settings the page can use, and writing them back and reading them
// again changes nothing. Runs for KILN_FUZZ_SECONDS (default 60) and prints the inputs tried.
import { test } from "node:test";
import assert from "node:assert/strict";
import { resolve } from "node:path";
import { build } from "esbuild";
import fc from "fast-check";
import { writeLayout } from "../../scripts/web/layout.mjs";

const pkg = resolve(process.env.CARGO_TARGET_DIR ?? "target", "web-pkg");
const layoutPath = await writeLayout(pkg);
const bundle = await build({
  entryPoints: ["web/src/settings.ts"],
  bundle: true,
  format: "esm",
  write: false,
  alias: { "kiln-layout": layoutPath },
  logLevel: "warning",
});
const settings = await import(`data:text/javascript;base64,${Buffer.from(bundle.outputFiles[0].text).toString("base64")}`);
const { default: LAYOUT } = await import(layoutPath, { with: { type: "json" } });

const KEYS = ["model", "precision", "mode", "prompt", "negative", "seed", "steps", "guidance", "scheduler", "width", "height", "strength", "resize", "mask_blur", "noise_level", "count", "backend"];
const VALUES = ["", " ", "0", "1", "-1", "1.5", "NaN", "Infinity", "1e400", "0x10", "4096", "4097", "9007199254740993", "txt2img", "inpaint", "upscale", "q4", "euler", "crop", "webgpu", "%", "%ZZ", "&", "=", "\u{1F600}", "\uD800"];

/** Query strings built from the reader's own keys with hostile values, and any text at all. */
const queries = fc.oneof(
  fc.string({ unit: "binary", maxLength: 200 }),
  fc
    .array(fc.tuple(fc.oneof(fc.constantFrom(...KEYS), fc.string()), fc.oneof(fc.constantFrom(...VALUES), fc.string({ unit: "binary" })), fc.boolean()), { maxLength: 12 })
    .map((pairs) => "?" + pairs.map(([k, v, escaped]) => (escaped ? `${escape(k)}=${escape(v)}` : `${k}=${v}`)).join("&")),
);

/** Percent-encoded as a link would be; a lone surrogate (which cannot be) stays as it is. */
function escape(text) {
  try {
    return encodeURIComponent(text);
  } catch {
    return text;
  }
}

function usable(s) {
  const int = (v, min, max) => Number.isInteger(v) && v >= min && v <= max;
  assert.ok(int(s.seed, 0, Number.MAX_SAFE_INTEGER), `seed ${s.seed}`);
  assert.ok(int(s.steps, 1, 1000), `steps ${s.steps}`);
  assert.ok(Number.isFinite(s.guidance), `guidance ${s.guidance}`);
  assert.ok(s.width === null || int(s.width, 8, 4096), `width ${s.width}`);
  assert.ok(s.height === null || int(s.height, 8, 4096), `height ${s.height}`);
  assert.ok(s.strength > 0 && s.strength <= 1, `strength ${s.strength}`);
  assert.ok(s.maskBlur >= 0 && s.maskBlur <= LAYOUT.max_mask_blur, `mask blur ${s.maskBlur}`);
  assert.ok(int(s.noiseLevel, 0, LAYOUT.max_noise_level), `noise level ${s.noiseLevel}`);
  assert.ok(int(s.count, 1, settings.MAX_COUNT), `count ${s.count}`);
  assert.ok(settings.MODES.includes(s.mode), `mode ${s.mode}`);
  assert.ok(LAYOUT.precisions.includes(s.precision), `precision ${s.precision}`);
  assert.ok(s.scheduler === "" || LAYOUT.schedulers.includes(s.scheduler), `scheduler ${s.scheduler}`);
  assert.ok(LAYOUT.resize_modes.some((m) => m.name === s.resizeMode), `resize mode ${s.resizeMode}`);
  assert.ok(typeof s.model === "string" && s.model.length > 0, `model ${s.model}`);
}

test("any share link gives usable settings that survive writing back", () => {
  const seconds = Number(process.env.KILN_FUZZ_SECONDS ?? 60);
  const result = fc.check(
    fc.property(queries, (query) => {
      const read = settings.fromQuery(query);
      usable(read);
      assert.deepEqual(settings.fromQuery(settings.toQuery(read)), read);
    }),
    { numRuns: Number.MAX_SAFE_INTEGER, interruptAfterTimeLimit: seconds * 1000, markInterruptAsFailure: false },
  );
  assert.ok(!result.failed, fc.defaultReportMessage(result));
  console.log(`fuzz share link: ${result.numRuns} inputs, no failure`);
});

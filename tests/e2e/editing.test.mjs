// Image to image, inpainting and upscaling (x4, latent x2 from an image or a result's latents)
// through the labelled controls give the native CLI's images (max ≤ 3/255, mean ≤ 0.5/255);
// images come in by file picker, drop, paste and "Use as input". The tests share one browser context (and so the model cache), in order.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { after, before, test } from "node:test";
import { PNG } from "pngjs";
import { appUrl, assertNative, echoConsole, errorText, fillSettings, generate, kiln, launch, pixelDiff, runKiln, startServers } from "./harness.mjs";

const FIXTURES = "tests/fixtures";
const INIT = `${FIXTURES}/editing/init.png`; // 64×64
const LOW_RES = `${FIXTURES}/editing/low_res.png`; // 32×32
const PROMPT = "a small house on a green hill under an evening sky";

let browser, servers, context;
before(async () => {
  [browser, servers] = await Promise.all([launch(), startServers()]);
  context = await browser.newContext();
});
after(async () => {
  await browser?.close();
  await servers?.close();
});

async function open(model, name, settings = {}) {
  const page = await context.newPage();
  echoConsole(page, name);
  await page.goto(appUrl(servers.app, `${servers.hub.url}/${model}`, settings));
  return page;
}

/** The CLI's run of `mode` with the same settings; `images` maps its image options to PNG bytes. */
function native(mode, model, { seed, steps, guidance, scheduler }, images, extra = []) {
  const dir = mkdtempSync(join(tmpdir(), "kiln-input-"));
  const files = Object.entries(images).flatMap(([option, png], i) => {
    const path = join(dir, `${i}.png`);
    writeFileSync(path, png);
    return [option, path];
  });
  return kiln([mode, "--model", `${FIXTURES}/${model}`, "--prompt", PROMPT, "--seed", String(seed), "--steps", String(steps),
    "--guidance", String(guidance), "--scheduler", scheduler, ...files, ...extra]);
}

/** A PNG's `parameters` text (its tEXt chunk). */
function parameters(png) {
  for (let at = 8; at < png.length; ) {
    const length = png.readUInt32BE(at);
    const chunk = png.subarray(at + 8, at + 8 + length).toString("latin1");
    if (png.toString("latin1", at + 4, at + 8) === "tEXt" && chunk.startsWith("parameters\0")) return chunk.slice("parameters\0".length);
    at += 12 + length;
  }
  return "";
}

/** Clicks "Download mask" and returns the PNG: what the engine receives as the mask. */
async function downloadMask(page) {
  const [download] = await Promise.all([page.waitForEvent("download"), page.getByRole("button", { name: "Download mask" }).click()]);
  return readFile(await download.path());
}

/** Grey levels of a mask PNG at image coordinates. */
function maskAt(png, points) {
  const { width, data } = PNG.sync.read(png);
  return points.map(([x, y]) => data[(y * width + x) * 4]);
}

/** A brush stroke on the mask from `from` to `to`, in the 64×64 image's pixels (a dot when equal). */
async function stroke(page, from, to = from) {
  const canvas = page.getByLabel("Mask", { exact: true });
  await canvas.scrollIntoViewIfNeeded();
  const box = await canvas.boundingBox();
  const at = ([x, y]) => [box.x + ((x + 0.5) * box.width) / 64, box.y + ((y + 0.5) * box.height) / 64];
  await page.mouse.move(...at(from));
  await page.mouse.down();
  await page.mouse.move(...at(to), { steps: 8 });
  await page.mouse.up();
}

/** The preview's pixels (RGBA), to compare with the file they came from. */
function previewPixels(page) {
  return page.evaluate(async () => {
    const img = document.querySelector("#init-preview");
    await img.decode();
    const canvas = new OffscreenCanvas(img.naturalWidth, img.naturalHeight);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    return Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data);
  });
}

async function assertPreviewIs(page, png) {
  assert.deepEqual(await previewPixels(page), Array.from(PNG.sync.read(png).data));
}

/** A file as a drag's or a paste's DataTransfer, in the page. */
function transfer(page, path) {
  return page.evaluateHandle(([bytes, name]) => {
    const data = new DataTransfer();
    data.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
    return data;
  }, [Array.from(readFileSync(path)), basename(path)]);
}

test("image to image: the labelled UI gives kiln img2img's image", async () => {
  const page = await open("sd1-tiny", "img2img");
  const settings = { prompt: PROMPT, seed: 7, steps: 2, guidance: 7.5, scheduler: "euler" };
  await page.getByLabel("Image to image", { exact: true }).check();
  await page.getByLabel("Init image", { exact: true }).setInputFiles(INIT);
  const strength = page.getByLabel("Strength", { exact: true });
  assert.equal(await strength.inputValue(), "0.8", "diffusers' default strength");
  await strength.fill("0.5"); // 2 steps × 0.5: one step runs
  await fillSettings(page, settings);
  const png = await generate(page);
  assertNative(png, native("img2img", "sd1-tiny", settings, { "--init-image": readFileSync(INIT) }, ["--strength", "0.5"]), "image to image");
  assert.match(parameters(png), /Seed: 7, Size: 64x64, Model: sd1-tiny, Denoising strength: 0.5$/);
  await page.close();
});

test("an image of another size is fitted by the Resize mode, as kiln img2img fits it, and the page says so", async () => {
  const page = await open("sd1-tiny", "resize");
  const settings = { prompt: PROMPT, seed: 4, steps: 2, guidance: 7.5, scheduler: "euler" };
  // 48×80: not a size the model takes (multiples of 32).
  const odd = new PNG({ width: 48, height: 80 });
  odd.data.forEach((_, i) => (odd.data[i] = i % 4 === 3 ? 255 : (i * 7) % 251));
  const file = join(mkdtempSync(join(tmpdir(), "kiln-odd-")), "odd.png");
  writeFileSync(file, PNG.sync.write(odd));
  await page.getByLabel("Image to image", { exact: true }).check();
  await page.getByLabel("Init image", { exact: true }).setInputFiles(file);
  await page.getByLabel("Resize mode", { exact: true }).selectOption({ label: "Crop and resize" });
  await fillSettings(page, { ...settings, width: 64, height: 64 });
  await page.getByText("odd.png: 48×80, fitted to 64×64 (Crop and resize).").waitFor();
  const png = await generate(page);
  await page.getByText("the init image (48×80) was resized to 64×64 (Crop and resize)").waitFor();
  const extra = ["--strength", "0.8", "--width", "64", "--height", "64", "--resize-mode", "crop"];
  assertNative(png, native("img2img", "sd1-tiny", settings, { "--init-image": readFileSync(file) }, extra), "a 48×80 image cropped to 64×64");
  await page.close();
});

test("inpainting: a brushed mask gives kiln inpaint's image; Clear and Invert repaint everything", async () => {
  const page = await open("sd1-inpaint-tiny", "inpaint");
  const settings = { prompt: PROMPT, seed: 11, steps: 2, guidance: 7.5, scheduler: "dpmpp-2m" };
  await page.getByLabel("Inpaint", { exact: true }).check();
  await page.getByLabel("Init image", { exact: true }).setInputFiles(INIT);
  assert.equal(await page.getByLabel("Strength", { exact: true }).inputValue(), "1", "diffusers' default strength");
  await page.getByLabel("Brush size", { exact: true }).fill("12");
  await stroke(page, [8, 16], [56, 16]);
  // The eraser takes a bite out of the stroke.
  await page.getByLabel("Eraser", { exact: true }).check();
  await stroke(page, [32, 16]);
  await page.getByLabel("Eraser", { exact: true }).uncheck();
  await page.getByLabel("Mask blur", { exact: true }).fill("2");
  const mask = await downloadMask(page);
  assert.deepEqual(maskAt(mask, [[12, 16], [52, 16], [32, 16], [32, 48]]), [255, 255, 0, 0], "painted, painted, erased, untouched");

  await fillSettings(page, settings);
  const png = await generate(page);
  const cli = native("inpaint", "sd1-inpaint-tiny", settings, { "--init-image": readFileSync(INIT), "--mask": mask }, ["--mask-blur", "2"]);
  assertNative(png, cli, "inpainting");
  assert.match(parameters(png), /Denoising strength: 1, Mask blur: 2$/);

  await page.getByRole("button", { name: "Clear mask" }).click();
  await page.getByRole("button", { name: "Invert mask" }).click();
  const { data } = PNG.sync.read(await downloadMask(page));
  assert.ok(data.every((v) => v === 255), "all white: repaint everything");
  await page.close();
});

test("upscaling: the labelled UI gives kiln upscale's image; other models are refused with a reason", async () => {
  const page = await open("sd-x4-upscaler-tiny", "upscale");
  const settings = { prompt: PROMPT, seed: 3, steps: 2, guidance: 7.5, scheduler: "ddim" };
  await page.getByLabel("Upscale", { exact: true }).check();
  await page.getByLabel("Init image", { exact: true }).setInputFiles(LOW_RES);
  assert.equal(await page.getByLabel("Noise level", { exact: true }).inputValue(), "20", "diffusers' default noise level");
  await page.getByLabel("Noise level", { exact: true }).fill("30");
  await fillSettings(page, settings);
  const png = await generate(page);
  assertNative(png, native("upscale", "sd-x4-upscaler-tiny", settings, { "--image": readFileSync(LOW_RES) }, ["--noise-level", "30"]), "upscaling 32² → 128²");
  assert.match(parameters(png), /Size: 128x128, Model: sd-x4-upscaler-tiny, Noise level: 30$/);
  await page.close();

  // A share link restores the mode; a model that is not an upscaler says so.
  const other = await open("sd1-inpaint-tiny", "not an upscaler", { mode: "upscale", noise_level: "30", prompt: PROMPT });
  assert.ok(await other.getByLabel("Upscale", { exact: true }).isChecked());
  assert.equal(await other.getByLabel("Noise level", { exact: true }).inputValue(), "30");
  await other.getByText("Upscale needs an upscaler model").waitFor();
  await other.getByLabel("Init image", { exact: true }).setInputFiles(LOW_RES);
  await other.getByRole("button", { name: "Generate", exact: true }).click();
  assert.match(await errorText(other), /not an upscaler/);
  await other.close();
});

test("the latent x2 upscaler gives kiln upscale's image; once loaded, it offers no noise level", async () => {
  const page = await open("sd-x2-latent-upscaler-tiny", "latent upscale");
  const settings = { prompt: PROMPT, seed: 4, steps: 2, guidance: 7.5 }; // its own scheduler
  await page.getByLabel("Upscale", { exact: true }).check();
  await page.getByLabel("Init image", { exact: true }).setInputFiles(INIT);
  await fillSettings(page, settings);
  const png = await generate(page);
  const cli = kiln(["upscale", "--model", `${FIXTURES}/sd-x2-latent-upscaler-tiny`, "--prompt", PROMPT, "--seed", "4", "--steps", "2", "--guidance", "7.5", "--image", INIT]);
  assertNative(png, cli, "latent upscaling 64² → 128²");
  assert.match(parameters(png), /Sampler: Euler, CFG scale: 7.5, Seed: 4, Size: 128x128, Model: sd-x2-latent-upscaler-tiny$/);
  assert.ok(await page.getByLabel("Noise level", { exact: true }).isHidden());
  await page.getByText("init.png: 64×64, upscaled to 128×128.").waitFor();
  await page.close();
});

test("a result upscales from its latents: the page equals kiln upscale --image-latents of kiln generate --save-latents", async () => {
  const page = await open("sd1-tiny", "latent chain");
  const first = { prompt: PROMPT, seed: 6, steps: 2, guidance: 7.5, width: 64, height: 64, scheduler: "euler" };
  await fillSettings(page, first);
  const result = await generate(page);
  await page.getByRole("button", { name: "Use as input" }).click();
  const url = page.getByLabel("Model URL", { exact: true });
  await url.fill(`${servers.hub.url}/sd-x2-latent-upscaler-tiny`);
  await url.dispatchEvent("change");
  await page.getByLabel("Upscale", { exact: true }).check();
  await fillSettings(page, { seed: 7, steps: 2, guidance: 7.5 });
  const png = await generate(page);

  const dir = mkdtempSync(join(tmpdir(), "kiln-latents-"));
  const [image, latents] = [join(dir, "result.png"), join(dir, "result.npy")];
  runKiln(["generate", "--model", `${FIXTURES}/sd1-tiny`, "--prompt", PROMPT, "--seed", "6", "--steps", "2", "--guidance", "7.5", "--scheduler", "euler",
    "--width", "64", "--height", "64", "--out", image, "--save-latents", latents]);
  assertNative(result, readFileSync(image), "the text-to-image result");
  const upscale = ["upscale", "--model", `${FIXTURES}/sd-x2-latent-upscaler-tiny`, "--prompt", PROMPT, "--seed", "7", "--steps", "2", "--guidance", "7.5", "--image", image];
  assertNative(png, kiln([...upscale, "--image-latents", latents]), "upscaled from its latents");
  const fromPixels = pixelDiff(png, kiln(upscale)).mean;
  console.log(`upscaled from the latents vs from the pixels: mean ${fromPixels.toFixed(2)}/255`);
  assert.ok(fromPixels > 1, "the latents, not the pixels encoded again, were upscaled");
  await page.close();
});

test("paste and drop bring an image in; Use as input moves a result into the next run", async () => {
  const page = await open("sd1-inpaint-tiny", "use as input");
  const settings = { prompt: PROMPT, seed: 5, steps: 1, guidance: 7.5, scheduler: "euler" };
  await fillSettings(page, settings);
  assert.ok(await page.getByLabel("Text to image", { exact: true }).isChecked());

  // Pasting an image on a text-to-image page switches to image to image.
  const pasted = await transfer(page, LOW_RES);
  await page.evaluate((data) => document.body.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true })), pasted);
  await page.getByText("low_res.png: 32×32").waitFor();
  assert.ok(await page.getByLabel("Image to image", { exact: true }).isChecked());
  await page.getByLabel("Steps", { exact: true }).fill("2");
  settings.steps = 2;
  await assertPreviewIs(page, readFileSync(LOW_RES));

  const dropped = await transfer(page, INIT);
  await page.locator("#drop-zone").dispatchEvent("dragover", { dataTransfer: dropped });
  await page.locator("#drop-zone").dispatchEvent("drop", { dataTransfer: dropped });
  await page.getByText("init.png: 64×64").waitFor();
  await assertPreviewIs(page, readFileSync(INIT));

  // A first inpainting (the whole image), then its result as the next one's input.
  await page.getByLabel("Inpaint", { exact: true }).check();
  await page.getByRole("button", { name: "Invert mask" }).click();
  const first = await generate(page);
  await page.getByRole("button", { name: "Use as input" }).click();
  await page.getByText("kiln-5.png: 64×64").waitFor();
  assert.ok(await page.getByLabel("Inpaint", { exact: true }).isChecked(), "the mode stays");
  await assertPreviewIs(page, first);
  await page.getByLabel("Brush size", { exact: true }).fill("16");
  await stroke(page, [20, 40], [44, 40]);
  const mask = await downloadMask(page);
  const second = await generate(page);
  assertNative(second, native("inpaint", "sd1-inpaint-tiny", settings, { "--init-image": first, "--mask": mask }), "inpainting a result");
  await page.close();
});

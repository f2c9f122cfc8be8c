// Automatic1111's prompt syntax gives the CLI's image in the page; the live preview shows the
// image as it forms and goes when the image comes, and not at all when it is turned off; the
// sharp preview decodes it with a TAESD repo; a PNG's parameters (A1111's or Kiln's) restore the settings. The tests share one page, in order.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { crc32 } from "node:zlib";
import { appUrl, assertNative, echoConsole, errorText, fillSettings, generate, kiln, launch, startServers } from "./harness.mjs";

const PROMPT = "a (lighthouse:1.3) on a cliff, [calm] sea BREAK ((stormy sky)), " + Array(70).fill("gulls").join(" ");
const NEGATIVE = "blurry, (low quality:1.2)";
const SETTINGS = { prompt: PROMPT, seed: 9, steps: 3, guidance: 7.5, width: 64, height: 64, scheduler: "euler" };

let browser, servers, page;
before(async () => {
  [browser, servers] = await Promise.all([launch(), startServers()]);
  page = await browser.newPage();
  echoConsole(page, "prompts");
  await page.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`));
}, { timeout: 30 * 60_000 });
after(async () => {
  await browser?.close();
  await servers?.close();
});

test("emphasis, BREAK and a prompt over 75 tokens give the CLI's image", async () => {
  const native = kiln(["generate", "--model", "tests/fixtures/sd1-tiny", "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", "9",
    "--steps", "3", "--guidance", "7.5", "--scheduler", "euler", "--width", "64", "--height", "64"]);
  await fillSettings(page, SETTINGS);
  await page.getByLabel("Negative prompt", { exact: true }).fill(NEGATIVE);
  assertNative(await generate(page), native, "A1111 prompt syntax");
});

/** Whether the preview canvas was shown during the next generation, and its pixels' spread then. */
async function watchPreview() {
  await page.evaluate(() => {
    const canvas = document.getElementById("live-preview");
    window.previews = [];
    new MutationObserver(() => {
      if (canvas.hidden) return;
      const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
      const red = [...data].filter((_, i) => i % 4 === 0);
      window.previews.push({ width: canvas.width, spread: Math.max(...red) - Math.min(...red) });
    }).observe(canvas, { attributes: true });
  });
}

test("the live preview shows the image as it forms, then gives way to the image", async () => {
  await page.getByLabel("Steps", { exact: true }).fill("6");
  await watchPreview();
  await generate(page);
  const previews = await page.evaluate(() => window.previews);
  assert.ok(previews.length >= 1, "the preview was shown");
  assert.ok(previews.every((p) => p.width === 8 && p.spread > 0), `one pixel per latent pixel, not flat: ${JSON.stringify(previews)}`);
  assert.equal(await page.getByRole("img", { name: "Preview of the image as it forms" }).isVisible(), false, "gone once the image is shown");

  await page.getByLabel("Live preview", { exact: true }).uncheck();
  await watchPreview();
  await generate(page);
  assert.deepEqual(await page.evaluate(() => window.previews), [], "no preview when it is off");
});

test("the sharp preview decodes with the TAESD repo given, at the image's size, fetched once", async () => {
  const { hub } = servers;
  await page.getByLabel("Live preview", { exact: true }).check();
  await page.getByLabel("Sharp preview (TAESD)").check();
  const decoder = page.getByLabel("Preview decoder (TAESD repo)");
  // Another kind of model in the diffusers layout is refused by name.
  await decoder.fill(`${hub.url}/sd1-tiny/vae`);
  await page.getByRole("button", { name: "Generate", exact: true }).click();
  assert.match(await errorText(page), /The sharp preview's decoder: .*it is a AutoencoderKL, not a tiny autoencoder/);

  await decoder.fill(`${hub.url}/taesd-tiny`);
  await watchPreview();
  await generate(page);
  const previews = await page.evaluate(() => window.previews);
  assert.ok(previews.length >= 1 && previews.every((p) => p.width === 64 && p.spread > 0), `the image's size, not flat: ${JSON.stringify(previews)}`);
  await generate(page);
  const gets = hub.log.filter((e) => e.method === "GET" && e.path.startsWith("/taesd-tiny/")).map((e) => e.path);
  assert.deepEqual(gets.sort(), ["/taesd-tiny/config.json", "/taesd-tiny/diffusion_pytorch_model.safetensors"], "each file fetched once");

  // Reloaded, the page remembers the choice and takes the decoder from the cache.
  await page.reload();
  assert.equal(await page.getByLabel("Sharp preview (TAESD)").isChecked(), true);
  await watchPreview();
  await generate(page);
  assert.ok((await page.evaluate(() => window.previews)).every((p) => p.width === 64));
  assert.equal(hub.log.filter((e) => e.method === "GET" && e.path.startsWith("/taesd-tiny/")).length, 2, "no download after the reload");

  await page.getByLabel("Sharp preview (TAESD)").uncheck();
  await watchPreview();
  await generate(page);
  assert.ok((await page.evaluate(() => window.previews)).every((p) => p.width === 8), "the approximate preview again");
});

/** `png` with a `parameters` text chunk, as Automatic1111 writes one. */
function withParameters(png, text) {
  const data = Buffer.concat([Buffer.from("tEXtparameters\0", "latin1"), Buffer.from(text, "latin1")]);
  const chunk = Buffer.alloc(data.length + 8);
  chunk.writeUInt32BE(data.length - 4, 0);
  data.copy(chunk, 4);
  chunk.writeUInt32BE(crc32(data), data.length + 4);
  const afterHeader = 8 + 8 + 13 + 4;
  return Buffer.concat([png.subarray(0, afterHeader), chunk, png.subarray(afterHeader)]);
}

/** Drops `png` on the Prompt field, as a file dragged from the desktop. */
async function dropOnPrompt(png, name) {
  await page.getByLabel("Prompt", { exact: true }).evaluate((prompt, { bytes, name }) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
    prompt.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  }, { bytes: [...png], name });
}

test("a PNG's parameters restore the settings; the fields without a setting are listed", async () => {
  const plain = readFileSync("tests/fixtures/editing/init.png");
  const a1111 = withParameters(plain, "a castle on a hill\nNegative prompt: fog\nSteps: 7, Sampler: DPM++ 2M, Schedule type: Karras, " +
    "CFG scale: 5.5, Seed: 4242, Size: 96x64, Model hash: abc123, Clip skip: 2");
  const file = join(mkdtempSync(join(tmpdir(), "kiln-png-")), "a1111.png");
  writeFileSync(file, a1111);
  await page.getByLabel("Settings from a PNG", { exact: true }).setInputFiles(file);
  await page.locator("#status").filter({ hasText: "Settings read from a1111.png." }).waitFor();
  const value = (label) => page.getByLabel(label, { exact: true }).inputValue();
  assert.deepEqual(
    await Promise.all(["Prompt", "Negative prompt", "Steps", "Scheduler", "Guidance scale", "Seed", "Width", "Height"].map(value)),
    ["a castle on a hill", "fog", "7", "dpmpp-2m-karras", "5.5", "4242", "96", "64"],
  );
  await page.getByText("Not applied from the PNG").waitFor();
  for (const field of ["Model hash: abc123", "Clip skip: 2"]) await page.getByText(field, { exact: true }).waitFor();

  // Kiln's own PNG, dropped on the prompt, gives the settings it was made with.
  await fillSettings(page, SETTINGS);
  const made = await generate(page);
  await fillSettings(page, { prompt: "something else", seed: 1, steps: 9 });
  await dropOnPrompt(made, "kiln.png");
  await page.locator("#status").filter({ hasText: "Settings read from kiln.png." }).waitFor();
  assert.deepEqual(await Promise.all(["Prompt", "Seed", "Steps"].map(value)), [PROMPT, "9", "3"]);

  await dropOnPrompt(plain, "plain.png");
  const alert = page.locator("#error");
  await alert.filter({ hasText: "No settings read from plain.png: this PNG carries no generation parameters" }).waitFor();
});

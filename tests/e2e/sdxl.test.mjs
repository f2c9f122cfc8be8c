// An SDXL pipeline (two text encoders, pooled text and time ids) in the page: text to image
// gives the native CLI's image, as downloaded and converted to q8 in the worker as it
// downloads; image to image and inpainting (by mask blend, as SDXL base has no inpainting UNet)
// too, their time ids the image's size.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { PNG } from "pngjs";
import { appUrl, assertNative, echoConsole, fillSettings, generate, kiln, launch, startServers } from "./harness.mjs";

const INIT = "tests/fixtures/editing/init.png"; // 64×64

const SETTINGS = { prompt: "a lighthouse at dusk", seed: 5, steps: 3, guidance: 5, width: 96, height: 64, scheduler: "euler" };
const NATIVE = ["generate", "--model", "tests/fixtures/sdxl-tiny", "--prompt", SETTINGS.prompt, "--seed", "5", "--steps", "3", "--guidance", "5",
  "--scheduler", "euler", "--width", "96", "--height", "64"];

let browser, servers;
before(async () => {
  [browser, servers] = await Promise.all([launch(), startServers()]);
}, { timeout: 30 * 60_000 });
after(async () => {
  await browser?.close();
  await servers?.close();
});

for (const [precision, extra] of [["original", []], ["q8", ["--weights", "q8"]]]) {
  test(`SDXL text to image (${precision} weights) gives the CLI's image`, async () => {
    const native = kiln([...NATIVE, ...extra]);
    const page = await browser.newPage();
    echoConsole(page, `sdxl ${precision}`);
    await page.goto(appUrl(servers.app, `${servers.hub.url}/sdxl-tiny`));
    if (precision !== "original") await page.getByLabel("Precision", { exact: true }).selectOption(precision);
    await fillSettings(page, SETTINGS);
    assertNative(await generate(page), native, `SDXL ${precision}`);
    await page.close();
  });
}

test("SDXL image to image and inpainting give kiln img2img's and kiln inpaint's images", async () => {
  const page = await browser.newPage();
  echoConsole(page, "sdxl editing");
  await page.goto(appUrl(servers.app, `${servers.hub.url}/sdxl-tiny`));
  const settings = { prompt: SETTINGS.prompt, seed: 8, steps: 3, guidance: 5, scheduler: "euler" };
  const cli = (mode, extra) => kiln([mode, "--model", "tests/fixtures/sdxl-tiny", "--prompt", settings.prompt, "--seed", "8", "--steps", "3",
    "--guidance", "5", "--scheduler", "euler", "--init-image", INIT, ...extra]);

  await page.getByLabel("Image to image", { exact: true }).check();
  await page.getByLabel("Init image", { exact: true }).setInputFiles(INIT);
  await page.getByLabel("Strength", { exact: true }).fill("0.7");
  await fillSettings(page, settings);
  assertNative(await generate(page), cli("img2img", ["--strength", "0.7"]), "SDXL image to image");

  await page.getByLabel("Inpaint", { exact: true }).check();
  await page.getByLabel("Strength", { exact: true }).fill("1");
  await page.getByLabel("Brush size", { exact: true }).fill("20");
  const canvas = page.getByLabel("Mask", { exact: true });
  await canvas.scrollIntoViewIfNeeded();
  const box = await canvas.boundingBox();
  await page.mouse.move(box.x + box.width * 0.2, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.8, box.y + box.height / 2, { steps: 8 });
  await page.mouse.up();
  const [download] = await Promise.all([page.waitForEvent("download"), page.getByRole("button", { name: "Download mask" }).click()]);
  const mask = join(mkdtempSync(join(tmpdir(), "kiln-sdxl-mask-")), "mask.png");
  writeFileSync(mask, await readFile(await download.path()));
  const painted = PNG.sync.read(readFileSync(mask)).data.filter((v, i) => i % 4 === 0 && v === 255).length;
  assert.ok(painted > 64 * 4, `the stroke painted the mask (${painted} white pixels)`);
  assertNative(await generate(page), cli("inpaint", ["--mask", mask, "--strength", "1"]), "SDXL inpainting (mask blend)");
  await page.close();
});

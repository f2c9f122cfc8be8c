// An SDXL pipeline (two text encoders, pooled text and time ids) in the page: text to image
// gives the native CLI's image, as downloaded and converted to q8 in the worker as it
// downloads; image to image too.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { appUrl, assertNative, echoConsole, fillSettings, generate, kiln, launch, startServers } from "./harness.mjs";

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

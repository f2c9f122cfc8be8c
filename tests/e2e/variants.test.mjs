// One weight-file rule: from a repo with both `X.safetensors` and `X.fp16.safetensors`, the page
// and the CLI take the same file (the fp16 variant), so a share link and the CLI agree.
import assert from "node:assert/strict";
import { test } from "node:test";
import { cpSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { serve } from "../../scripts/web/server.mjs";
import { appUrl, assertNative, echoConsole, fillSettings, generate, kiln, launch, pixelDiff, startServers, withValue } from "./harness.mjs";

const SETTINGS = { prompt: "a lighthouse at dusk", seed: 42, steps: 2, guidance: 7.5, width: 64, height: 64, scheduler: "euler" };
const ARGS = ["--prompt", SETTINGS.prompt, "--seed", "42", "--steps", "2", "--guidance", "7.5", "--scheduler", "euler", "--width", "64", "--height", "64"];

test("the page and the CLI take the same weight file from a repo with both variants", async () => {
  const root = mkdtempSync(join(tmpdir(), "kiln-variants-"));
  const repo = join(root, "sd1-variants");
  cpSync("tests/fixtures/sd1-tiny", repo, { recursive: true });
  // The variant differs from the full file where it shows in the image: the UNet's last bias.
  const unet = join(repo, "unet/diffusion_pytorch_model");
  writeFileSync(`${unet}.fp16.safetensors`, withValue(readFileSync(`${unet}.safetensors`), "conv_out.bias", 0.5));

  const native = kiln(["generate", "--model", repo, ...ARGS]);
  const full = kiln(["generate", "--model", "tests/fixtures/sd1-tiny", ...ARGS]);
  assert.ok(pixelDiff(native, full).max > 20, "the fp16 variant's image differs from the full file's");

  const [browser, servers, host] = await Promise.all([launch(), startServers(), serve({ root, cors: true })]);
  try {
    const page = await browser.newPage();
    echoConsole(page, "variants");
    await page.goto(appUrl(servers.app, `${host.url}/sd1-variants`));
    await fillSettings(page, SETTINGS);
    assertNative(await generate(page), native, "a repo with both variants");
  } finally {
    await browser.close();
    await Promise.all([servers.close(), host.close()]);
  }
});

// A LoRA named in the prompt as <lora:name:weight> gives the CLI's image with --lora: its file,
// listed under "LoRA files", is fetched once into the cache and merged as the model loads; a
// share link carries the list; a name not listed is refused before anything runs.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { appUrl, assertNative, echoConsole, errorText, fillSettings, generate, kiln, launch, pixelDiff, startServers } from "./harness.mjs";

const SETTINGS = { prompt: "a red kiln <lora:sd1-kohya:0.8>", seed: 21, steps: 3, guidance: 7.5, width: 64, height: 64, scheduler: "euler" };
const NATIVE = ["generate", "--model", "tests/fixtures/sd1-tiny", "--seed", "21", "--steps", "3", "--guidance", "7.5", "--scheduler", "euler",
  "--width", "64", "--height", "64"];

let browser, servers, page;
before(async () => {
  [browser, servers] = await Promise.all([launch(), startServers()]);
  page = await browser.newPage();
  echoConsole(page, "lora");
  await page.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`));
}, { timeout: 30 * 60_000 });
after(async () => {
  await browser?.close();
  await servers?.close();
});

const loraGets = () => servers.hub.log.filter((e) => e.method === "GET" && e.path.startsWith("/lora/")).map((e) => e.path);

test("a LoRA named in the prompt gives the CLI's image with --lora, fetched once", async () => {
  const withLora = kiln([...NATIVE, "--prompt", "a red kiln", "--lora", "tests/fixtures/lora/sd1-kohya.safetensors:0.8"]);
  const without = kiln([...NATIVE, "--prompt", "a red kiln"]);
  await fillSettings(page, SETTINGS);
  await page.getByLabel("LoRA files", { exact: true }).fill(`${servers.hub.url}/lora/sd1-kohya.safetensors\n${servers.hub.url}/lora/sd1-peft.safetensors`);
  assertNative(await generate(page), withLora, "LoRA");
  assert.ok(pixelDiff(withLora, without).mean > 4, "the LoRA changes the image");
  assert.match(new URL(page.url()).search, /lora=.*sd1-kohya\.safetensors/, "the share link lists the LoRA files");

  // Without the tag the model is the plain one again; with it again, nothing more is fetched.
  await fillSettings(page, { prompt: "a red kiln" });
  assertNative(await generate(page), without, "no LoRA");
  await fillSettings(page, SETTINGS);
  assertNative(await generate(page), withLora, "LoRA again");
  assert.deepEqual(loraGets(), ["/lora/sd1-kohya.safetensors"]);
});

test("a prompt naming a LoRA that is not listed, or one made for another model, is refused", async () => {
  await fillSettings(page, { prompt: "a red kiln <lora:ink:1>" });
  await page.getByRole("button", { name: "Generate", exact: true }).click();
  assert.match(await errorText(page), /The prompt names LoRA “ink”, which is not among the LoRA files \(sd1-kohya, sd1-peft\)/);

  await page.getByLabel("LoRA files", { exact: true }).fill(`${servers.hub.url}/lora/sd2-kohya.safetensors`);
  await fillSettings(page, { prompt: "a red kiln <lora:sd2-kohya:1>" });
  await page.getByRole("button", { name: "Generate", exact: true }).click();
  assert.match(await errorText(page), /LoRA `sd2-kohya`.*another/);
});

// Where the engine runs. Without WebGPU, or with only a software adapter (SwiftShader here),
// the page runs it on the CPU in WebAssembly and says so on its "Backend" line; that image
// equals the native CLI's on its CPU backend. `backend=webgpu` where WebGPU is missing gets a
// page-level message naming the browsers and flags that work.
import assert from "node:assert/strict";
import { test } from "node:test";
import { appUrl, assertNative, echoConsole, fillSettings, generate, kiln, launch, startServers } from "./harness.mjs";

const SETTINGS = { prompt: "a lighthouse at dusk", seed: 42, steps: 3, guidance: 7.5, width: 64, height: 64, scheduler: "euler" };

/** The page's "Backend: …" line. */
async function backendLine(page) {
  const line = page.getByText(/^Backend: /);
  await line.waitFor();
  return line.textContent();
}

test("without WebGPU the page generates on the CPU, the native CLI's CPU image", async () => {
  const native = kiln(["generate", "--model", "tests/fixtures/sd1-tiny", "--backend", "cpu", "--prompt", SETTINGS.prompt, "--seed", "42", "--steps", "3",
    "--guidance", "7.5", "--scheduler", "euler", "--width", "64", "--height", "64"]);
  const [browser, servers] = await Promise.all([launch({ webgpu: false }), startServers()]);
  try {
    const page = await browser.newPage();
    echoConsole(page, "cpu");
    await page.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`, { backend: "auto" }));
    assert.match(await backendLine(page), /^Backend: CPU \(WebAssembly SIMD, one thread\): no usable WebGPU here$/);
    await fillSettings(page, SETTINGS);
    assertNative(await generate(page), native, "CPU in the page");
  } finally {
    await browser.close();
    await servers.close();
  }
});

test("a software WebGPU adapter is passed over for the CPU unless WebGPU is forced", async () => {
  const [browser, servers] = await Promise.all([launch(), startServers()]);
  try {
    const page = await browser.newPage();
    await page.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`, { backend: "auto" }));
    assert.match(await backendLine(page), /^Backend: CPU .*: the only WebGPU adapter is a software one \(WebGPU \(google swiftshader, software adapter\)\)$/);
    await page.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`));
    assert.equal(await backendLine(page), "Backend: WebGPU (google swiftshader, software adapter)");
  } finally {
    await browser.close();
    await servers.close();
  }
});

test("forcing WebGPU in a browser without it gets a page-level message", async () => {
  const [browser, servers] = await Promise.all([launch({ webgpu: false }), startServers()]);
  try {
    const page = await browser.newPage();
    await page.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`));
    const message = page.getByRole("alert").filter({ hasText: "needs WebGPU" });
    await message.waitFor();
    assert.match(await message.textContent(), /Chrome and Edge 113\+.*enable-unsafe-webgpu/s);
    assert.ok(await page.getByRole("button", { name: "Generate", exact: true }).isDisabled());
  } finally {
    await browser.close();
    await servers.close();
  }
});

// Without WebGPU the page says so, and which browsers and flags work, instead of failing later.
import assert from "node:assert/strict";
import { test } from "node:test";
import { launch, startServers } from "./harness.mjs";

test("a browser without WebGPU gets a page-level message", async () => {
  const [browser, servers] = await Promise.all([launch({ webgpu: false }), startServers()]);
  try {
    const page = await browser.newPage();
    await page.goto(`${servers.app.url}/`);
    const message = page.getByRole("alert").filter({ hasText: "needs WebGPU" });
    await message.waitFor();
    assert.match(await message.textContent(), /Chrome and Edge 113\+.*enable-unsafe-webgpu/s);
    assert.ok(await page.getByRole("button", { name: "Generate", exact: true }).isDisabled());
  } finally {
    await browser.close();
    await servers.close();
  }
});

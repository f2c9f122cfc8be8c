// A small static file server: correct MIME types (application/wasm for the engine), HEAD,
// single byte ranges, the app's Content-Security-Policy as a header, and, when asked, CORS.
// scripts/serve runs it on dist/; the browser tests also run it as a stand-in for the model
// hub, with `intercept` to break responses.
//
//   node scripts/web/server.mjs DIR [PORT]
import { createServer } from "node:http";
import { readFile, stat } from "node:fs/promises";
import { extname, join, normalize, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const MIME = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".webmanifest": "application/manifest+json",
  ".wasm": "application/wasm",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".txt": "text/plain; charset=utf-8",
  ".map": "application/json",
};

/**
 * Serves `root` on 127.0.0.1:`port` (0 picks a free port); resolves to { url, close }.
 * - cors: allow any origin to read files, ranges and their headers (as the HF hub does).
 * - log: an array that receives { method, path, range, status, sent } per request.
 * - intercept(path, body, method): may return { body, headers, stallAfter, stalled } to serve other
 *   bytes, add headers, or hang the connection after `stallAfter` body bytes; once those are
 *   sent, `stalled` gets a function that drops the connection.
 */
export async function serve({ root, port = 0, cors = false, log = null, intercept = null }) {
  root = resolve(root);
  // The page's policy (its <meta> tag), sent with every file: a <meta> policy does not reach
  // the worker, which takes its policy from its own response.
  const page = await readFile(join(root, "index.html"), "utf8").catch(() => "");
  const csp = /<meta http-equiv="Content-Security-Policy" content="([^"]+)"/.exec(page)?.[1];
  const server = createServer((req, res) => {
    handle(req, res).catch((e) => {
      if (!res.headersSent) res.writeHead(500).end(String(e));
    });
  });

  async function handle(req, res) {
    const path = decodeURIComponent(new URL(req.url, "http://localhost").pathname);
    const file = join(root, normalize(path.endsWith("/") ? `${path}index.html` : path));
    const entry = { method: req.method, path, range: req.headers.range ?? null, status: 0, sent: 0 };
    log?.push(entry);
    const reply = (status, headers = {}, body = null) => {
      entry.status = status;
      res.writeHead(status, headers);
      res.end(body);
    };
    if (cors) {
      res.setHeader("Access-Control-Allow-Origin", "*");
      res.setHeader("Access-Control-Expose-Headers", "Content-Length, Content-Range, Accept-Ranges, ETag, X-Linked-Etag");
    }
    if (req.method === "OPTIONS") return reply(204, { "Access-Control-Allow-Headers": "Range", "Access-Control-Allow-Methods": "GET, HEAD" });
    if (req.method !== "GET" && req.method !== "HEAD") return reply(405);
    if (!file.startsWith(root) || !(await stat(file).catch(() => null))?.isFile()) return reply(404, {}, "not found");

    const original = await readFile(file);
    const override = intercept?.(path, original, req.method) ?? {};
    const body = override.body ?? original;
    const headers = {
      "Content-Type": MIME[extname(file)] ?? "application/octet-stream",
      "Accept-Ranges": "bytes",
      "Cache-Control": "no-cache",
      ...(csp && { "Content-Security-Policy": csp }),
      ...override.headers,
    };
    let slice = body;
    let status = 200;
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? "");
    if (range) {
      const start = Number(range[1]);
      const end = range[2] ? Math.min(Number(range[2]), body.length - 1) : body.length - 1;
      if (start >= body.length || end < start) return reply(416, { "Content-Range": `bytes */${body.length}` });
      slice = body.subarray(start, end + 1);
      status = 206;
      headers["Content-Range"] = `bytes ${start}-${end}/${body.length}`;
    }
    headers["Content-Length"] = slice.length;
    entry.status = status;
    res.writeHead(status, headers);
    if (req.method === "HEAD") return res.end();
    const limit = override.stallAfter;
    if (limit === undefined || limit >= slice.length) {
      entry.sent = slice.length;
      return res.end(slice);
    }
    entry.sent = limit;
    res.write(slice.subarray(0, limit), () => override.stalled?.(() => res.destroy()));
  }

  await new Promise((done) => server.listen(port, "127.0.0.1", done));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    close: () => {
      server.closeAllConnections();
      return new Promise((done) => server.close(done));
    },
  };
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [root = "dist", port = "8080"] = process.argv.slice(2);
  const { url } = await serve({ root, port: Number(port) });
  console.log(`Serving ${root} at ${url}/ (Ctrl+C stops)`);
}

// A model host that answers as the Hugging Face hub does, for the download drills: repos under
// `/<owner>/<name>/resolve/<revision>/<path>` (a folder `<name>` of `root`); weight files
// (`*.safetensors`, stored with Git LFS on the hub) redirected to a CDN on another origin,
// the redirect stating their SHA-256 in `X-Linked-Etag` and `ETag`; other files served
// directly with a weak ETag (a git blob id); LFS pointers at `/<owner>/<name>/raw/<revision>/`;
// HEAD and Range on both origins; CORS that exposes only some headers. Drills break it:
// busy or gated answers (429/503 with Retry-After, 401), a connection that stalls until
// dropped, a CDN that sends other bytes than the digest says, a file that changes.
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { createServer } from "node:http";
import { join, normalize } from "node:path";

const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex");
/** Git's blob id, the ETag the hub gives files kept in git. */
const gitOid = (bytes) => createHash("sha1").update(`blob ${bytes.length}\0`).update(bytes).digest("hex");
const isLfs = (path) => path.endsWith(".safetensors");

/**
 * Serves `root` as the hub's owner `owner`; resolves to { url, cdn, log, repo, refuse, stall, corrupt, change, close }.
 * `log` receives { origin: "hub" | "cdn", method, path, range, status, sent } per request.
 */
export async function serveHub({ root, owner = "kiln-test" }) {
  const log = [];
  /** Drills by repo path (`sd1-tiny/unet/…`): refusals left (busy, gated), stalls, changed contents. */
  const refusals = new Map();
  const stalls = new Map();
  const changed = new Map();
  const corrupt = new Set();
  const blobs = new Map();
  const open = new Set();

  const contents = async (file) => changed.get(file) ?? readFile(join(root, normalize(file)));

  /** Sends `body` (whole or the asked range), unless a stall drill holds it after some bytes. */
  const send = (req, res, entry, body, headers, file) => {
    let [status, slice] = [200, body];
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    if (range) {
      const start = Number(range[1]);
      if (start >= body.length) return reply(res, entry, 416, { "Content-Range": `bytes */${body.length}` });
      [status, slice] = [206, body.subarray(start)];
      headers["Content-Range"] = `bytes ${start}-${body.length - 1}/${body.length}`;
    }
    res.writeHead((entry.status = status), { ...headers, "Accept-Ranges": "bytes", "Content-Length": slice.length });
    if (req.method === "HEAD") return res.end();
    const stall = req.method === "GET" && stalls.get(file);
    if (!stall || stall.after >= slice.length) {
      entry.sent = slice.length;
      return res.end(slice);
    }
    stalls.delete(file);
    entry.sent = stall.after;
    res.write(slice.subarray(0, stall.after), () => stall.held(() => res.destroy()));
  };

  const reply = (res, entry, status, headers = {}, text = "") => {
    res.writeHead((entry.status = status), headers);
    res.end(text);
  };

  /** A server for origin `name` that logs each request, exposes `exposed` and answers preflights. */
  const originServer = (name, exposed, handle) =>
    createServer((req, res) => {
      const url = new URL(req.url, `http://${name}`);
      const entry = { origin: name, method: req.method, path: url.pathname, range: req.headers.range ?? null };
      log.push(entry);
      res.setHeader("Access-Control-Allow-Origin", "*");
      res.setHeader("Access-Control-Expose-Headers", exposed);
      if (req.method !== "OPTIONS") return handle(req, res, url, entry);
      res.setHeader("Access-Control-Allow-Headers", "Range");
      reply(res, entry, 204);
    });

  const hub = originServer("hub", "ETag, X-Repo-Commit, Content-Range, Accept-Ranges", async (req, res, url, entry) => {
    const parts = /^\/([^/]+)\/([^/]+)\/(resolve|raw)\/([^/]+)\/(.+)$/.exec(decodeURIComponent(url.pathname));
    if (!parts || parts[1] !== owner) return reply(res, entry, 404, { "X-Error-Code": "RepoNotFound" }, "Repository not found");
    const [, , repo, kind, revision, path] = parts;
    const file = `${repo}/${path}`;
    const body = await contents(file).catch(() => null);
    if (!body) return reply(res, entry, 404, { "X-Error-Code": "EntryNotFound" }, "Entry not found");
    const left = refusals.get(`${req.method} ${file}`);
    if (left?.times) {
      left.times--;
      return reply(res, entry, left.status, { "Retry-After": String(left.retryAfter) }, "Refused");
    }
    const commit = { "X-Repo-Commit": createHash("sha1").update(revision).digest("hex") };
    if (kind === "raw") {
      const text = isLfs(path) ? `version https://git-lfs.github.com/spec/v1\noid sha256:${sha256(body)}\nsize ${body.length}\n` : body;
      return send(req, res, entry, Buffer.from(text), { ...commit, "Content-Type": "text/plain; charset=utf-8" }, null);
    }
    if (isLfs(path)) {
      const digest = sha256(body);
      blobs.set(digest, file);
      return reply(res, entry, 302, {
        ...commit,
        Location: `${cdn.url}/repos/${digest}?file=${encodeURIComponent(path)}`,
        ETag: `"${digest}"`,
        "X-Linked-Etag": `"${digest}"`,
        "X-Linked-Size": String(body.length),
      });
    }
    send(req, res, entry, body, { ...commit, ETag: `W/"${gitOid(body)}"` }, file);
  });

  // The CDN knows files by digest only: a changed file is another URL.
  const cdnServer = originServer("cdn", "Content-Range, Accept-Ranges, ETag", async (req, res, url, entry) => {
    const file = blobs.get(url.pathname.replace("/repos/", ""));
    let body = file && (await contents(file));
    if (!body || sha256(body) !== url.pathname.replace("/repos/", "")) return reply(res, entry, 404);
    entry.file = file;
    const etag = `"${createHash("md5").update(body).digest("hex")}"`;
    if (req.method === "GET" && corrupt.delete(file)) {
      body = Buffer.from(body);
      for (let i = body.length >> 1; i < (body.length >> 1) + 64; i++) body[i] ^= 0xff;
    }
    send(req, res, entry, body, { ETag: etag }, file);
  });

  const listen = async (server) => {
    server.on("connection", (socket) => {
      open.add(socket);
      socket.on("close", () => open.delete(socket));
    });
    await new Promise((done) => server.listen(0, "127.0.0.1", done));
    return `http://127.0.0.1:${server.address().port}`;
  };
  const cdn = { url: await listen(cdnServer) };
  const url = await listen(hub);
  return {
    url,
    cdn: cdn.url,
    log,
    /** The base URL of repo `name`, as the page and `kiln --model` take it. */
    repo: (name, revision = "main") => `${url}/${owner}/${name}/resolve/${revision}`,
    /** The next `times` `method` requests of `file` are answered `status` with `Retry-After: retryAfter`. */
    refuse: (file, { status = 429, retryAfter = 1, times = 1, method = "GET" } = {}) => refusals.set(`${method} ${file}`, { status, retryAfter, times }),
    /** The next GET of `file` sends `after` bytes, then nothing until the returned `drop()`. */
    stall: (file, after) => {
      let [dropped, destroy] = [false, null];
      stalls.set(file, { after, held: (d) => (dropped ? d() : (destroy = d)) });
      return { drop: () => ((dropped = true), destroy?.()) };
    },
    /** The CDN's next GET of `file` sends flipped bytes under the file's digest. */
    corrupt: (file) => corrupt.add(file),
    /** From now on `file` has these bytes (a new commit). */
    change: (file, bytes) => changed.set(file, Buffer.from(bytes)),
    close: () => {
      for (const socket of open) socket.destroy();
      return Promise.all([hub, cdnServer].map((s) => new Promise((done) => s.close(done))));
    },
  };
}

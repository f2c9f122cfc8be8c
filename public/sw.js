// Keeps the app shell (page, scripts, wasm, styles, icons) for offline use. The model is
// not here: the worker stores it in IndexedDB. scripts/build fills in the two constants;
// a new build changes VERSION, so browsers install the new shell and drop the old one.
// A new version waits until no page runs the old one (no skipWaiting), so a page never
// mixes its scripts with another build's worker and wasm.
const VERSION = "dev";
const SHELL = [];
const CACHE = `kiln-shell-${VERSION}`;

self.addEventListener("install", (event) => {
  // Past the HTTP cache, which may still hold the previous build's files.
  const requests = SHELL.map((url) => new Request(url, { cache: "reload" }));
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(requests)));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys()
      .then((keys) => Promise.all(keys.filter((k) => k.startsWith("kiln-shell-") && k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

const ROOT = new URL("./", location.href);

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  // Other hosts (model downloads) are left to the network; same-origin files the app cache
  // lacks (a model the site hosts itself) are fetched below as asked, Range included.
  if (event.request.method !== "GET" || url.origin !== location.origin) return;
  // The page is one document whatever its query string (the settings) says.
  const page = url.pathname === ROOT.pathname || url.pathname === `${ROOT.pathname}index.html`;
  event.respondWith(
    caches.open(CACHE)
      .then((cache) => (page ? cache.match(ROOT.href) : cache.match(event.request)))
      .then((hit) => hit ?? fetch(event.request)),
  );
});

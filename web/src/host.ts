// Asking a model host for a file, as the Hugging Face hub answers: a weight file is a redirect
// to a CDN on another origin (which fetch follows unseen); a busy host answers 429 or 503,
// maybe with a Retry-After the page may not be allowed to read (CORS exposes only some
// headers); the file's SHA-256 is stated in a header or in its LFS pointer.

/** The host has no such file (HTTP 404). */
export class NotFound extends Error {}
/** The connection failed or dropped, or the host stayed busy; what was stored is kept for the next attempt. */
export class NetworkError extends Error {}

/** Times a busy host is asked again per request. */
const BUSY_RETRIES = 3;
/** The longest Retry-After waited for, in seconds; a host that asks for more is reported at once. */
const MAX_RETRY_AFTER = 60;

/** Runs a fetch step for the file at `url`, turning a lost connection into a NetworkError naming it. */
export async function network<T>(url: string, step: () => Promise<T>): Promise<T> {
  try {
    return await step();
  } catch (e) {
    throw new NetworkError(`${url}: the connection failed (${(e as Error).message}); check the connection and try again.`);
  }
}

/**
 * `fetch(url, init)`, asking a busy host (HTTP 429 or 503) again after the wait its Retry-After
 * asks for, or 1, 2, 4 s when the page cannot read one. Returns the last answer.
 */
export async function hostFetch(url: string, init: RequestInit): Promise<Response> {
  for (let retry = 0; ; retry++) {
    const res = await network(url, () => fetch(url, init));
    if ((res.status !== 429 && res.status !== 503) || retry === BUSY_RETRIES) return res;
    const stated = Number(res.headers.get("retry-after") ?? NaN);
    const wait = Number.isFinite(stated) && stated >= 0 ? stated : 2 ** retry;
    await res.body?.cancel();
    if (wait > MAX_RETRY_AFTER) throw new NetworkError(`${url}: the host is busy (HTTP ${res.status}) and asks to wait ${wait} s; try again later.`);
    console.warn(`Kiln: ${url}: the host is busy (HTTP ${res.status}); asking again in ${wait} s`);
    await new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, wait * 1000);
      init.signal?.addEventListener("abort", () => (clearTimeout(timer), reject(new Error("cancelled"))), { once: true });
    });
  }
}

/** The error for an answer that is not the file: NotFound for 404, else a NetworkError (a retry may do). */
export function refusal(url: string, res: Response): Error {
  if (res.status === 404) return new NotFound(`${url} was not found (HTTP 404)`);
  if (res.status === 401 || res.status === 403) {
    return new NetworkError(`${url}: the host refuses access (HTTP ${res.status}); a gated or private repo needs another host or a copy on this site.`);
  }
  return new NetworkError(`${url}: the host answered HTTP ${res.status}; try again later.`);
}

/** The SHA-256 the host states: the HF hub puts it in `x-linked-etag` (LFS files) or `etag`. */
export async function statedSha256(res: Response, base: string, path: string): Promise<string | null> {
  for (const name of ["x-linked-etag", "etag"]) {
    const value = res.headers.get(name)?.replace(/^W\//, "").replaceAll('"', "");
    if (value && /^[0-9a-f]{64}$/i.test(value)) return value.toLowerCase();
  }
  return hubPointerSha256(base, path);
}

/**
 * On the hub the `x-linked-etag` sits on the redirect to the CDN, which fetch follows unseen;
 * the same SHA-256 is in the file's LFS pointer at `…/raw/<revision>/<path>`, on the host the
 * user chose (any host laid out as the hub is).
 */
async function hubPointerSha256(base: string, path: string): Promise<string | null> {
  const hub = /^(https?:\/\/.+)\/resolve\/([^/]+)$/.exec(base);
  if (!hub || !path.endsWith(".safetensors")) return null;
  const res = await hostFetch(`${hub[1]}/raw/${hub[2]}/${path}`, { cache: "no-store" }).catch(() => null);
  return (res?.ok && /^oid sha256:([0-9a-f]{64})$/m.exec(await res.text())?.[1]) || null;
}

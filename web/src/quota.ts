// The storage the browser gives this site (Storage API), and what to say when it runs out.
import { bytes } from "./format";

/** The storage the browser still allows this site; null where it does not say. */
export async function freeStorage(): Promise<number | null> {
  if (!navigator.storage?.estimate) return null;
  const { quota, usage = 0 } = await navigator.storage.estimate();
  return quota === undefined ? null : Math.max(0, quota - usage);
}

/** Why a download of `needed` bytes cannot start with `free` bytes left. */
export function tooLarge(needed: number, free: number): string {
  return `The model needs ${bytes(needed)} more storage, but the browser allows this site only ${bytes(free)} more. Free disk space or remove other cached models, then try again.`;
}

/** What to say when a write hit the quota: the numbers, and that nothing stored is lost. */
export async function storageFull(): Promise<string> {
  const { quota, usage } = (await navigator.storage?.estimate?.()) ?? {};
  const numbers = quota !== undefined && usage !== undefined ? `: ${bytes(usage)} used of the ${bytes(quota)} it allows` : "";
  return `The browser's storage for this site is full${numbers}. Free disk space or remove other cached models, then press Generate: the download continues where it stopped.`;
}

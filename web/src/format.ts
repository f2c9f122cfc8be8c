// How the page writes sizes and durations, in its own text and in the cache's messages.

export function bytes(n: number): string {
  if (n < 1e3) return `${Math.round(n)} B`;
  const [unit, scale] = n < 1e6 ? ["kB", 1e3] : n < 1e9 ? ["MB", 1e6] : ["GB", 1e9];
  return `${(n / scale).toFixed(n / scale < 10 ? 2 : 1)} ${unit}`;
}

export function duration(seconds: number): string {
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

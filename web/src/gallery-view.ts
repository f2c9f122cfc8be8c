// The gallery on the page: a thumbnail of every kept result, newest first. Opening one hands
// it to the page, which restores its settings and shows it as the result (Download PNG, Use as
// input, Delete). "Delete all" empties it; its size is shown beside the model cache's.
import { freeStorage } from "./quota";
import { bytes } from "./format";
import type { GalleryImage } from "./gallery";
import type { GalleryAnswers, GalleryAsk } from "./protocol";
import { caption, fromQuery } from "./settings";

export interface GalleryElements {
  list: HTMLOListElement;
  info: HTMLElement;
  deleteAll: HTMLButtonElement;
  /** The result's Delete button. */
  deleteResult: HTMLButtonElement;
  /** The storage line beside the model cache's. */
  storage: HTMLElement;
}

export class GalleryView {
  /** The kept image shown as the result; null while the result is not (yet) kept. */
  private shown: number | null = null;
  /** Bumped whenever another image is shown, so a slow `keep` does not claim a later one. */
  private showings = 0;
  private urls: string[] = [];
  private size = "";

  constructor(
    private readonly ui: GalleryElements,
    /** Asks the gallery, which the worker keeps. */
    private readonly ask: <A extends GalleryAsk>(ask: A) => Promise<GalleryAnswers[A["op"]]>,
    private readonly open: (image: GalleryImage) => void,
    private readonly deleted: () => void,
  ) {
    ui.deleteAll.addEventListener("click", () => void this.deleteAll());
    ui.deleteResult.addEventListener("click", () => void this.deleteShown());
  }

  /** Keeps a new result, the one now shown. */
  async keep(query: string, name: string, png: Uint8Array): Promise<void> {
    this.showing(null);
    const showing = this.showings;
    try {
      const { id } = await this.ask({ op: "add", query, name, png });
      if (showing === this.showings) this.showing(id);
      await this.refresh();
    } catch (e) {
      await this.refresh(`The last image could not be kept in the gallery (${(e as Error).message}); download it to keep it.`);
    }
  }

  async refresh(problem = ""): Promise<void> {
    const all = await this.ask({ op: "list" });
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = all.map((image) => URL.createObjectURL(image.thumb));
    this.ui.list.replaceChildren(...all.map((image, i) => this.item(image, this.urls[i])));
    const taken = all.reduce((sum, image) => sum + image.png.size + image.thumb.size, 0);
    this.size = `${all.length} ${all.length === 1 ? "image" : "images"}, ${bytes(taken)}`;
    const info = all.length > 0 ? `${this.size}, newest first. Open one to see it with its settings.` : "Every image you generate is kept here, in this browser.";
    this.ui.info.textContent = problem ? `${problem} ${info}` : info;
    this.ui.deleteAll.disabled = all.length === 0;
    await this.showStorage();
  }

  /** The gallery's size and the storage left, beside the model cache's line. */
  async showStorage(): Promise<void> {
    const free = await freeStorage();
    this.ui.storage.textContent = `Gallery: ${this.size}${free === null ? "" : `; ${bytes(free)} more storage is free for this site`}.`;
  }

  private showing(id: number | null): void {
    this.showings++;
    this.shown = id;
    this.ui.deleteResult.disabled = id === null;
  }

  private item(image: GalleryImage, url: string): HTMLLIElement {
    const label = caption(fromQuery(image.query));
    const button = document.createElement("button");
    button.type = "button";
    button.title = label;
    button.setAttribute("aria-label", `Open ${label}`);
    const thumb = new Image();
    thumb.src = url;
    thumb.alt = "";
    button.append(thumb);
    button.addEventListener("click", () => {
      this.showing(image.id);
      this.open(image);
    });
    const li = document.createElement("li");
    li.append(button);
    return li;
  }

  private async deleteShown(): Promise<void> {
    if (this.shown === null) return;
    await this.ask({ op: "delete", id: this.shown });
    this.showing(null);
    this.deleted();
    await this.refresh();
  }

  private async deleteAll(): Promise<void> {
    if (!confirm(`Delete all ${this.size} from the gallery? This cannot be undone.`)) return;
    await this.ask({ op: "clear" });
    if (this.shown !== null) this.deleted();
    this.showing(null);
    await this.refresh();
  }
}

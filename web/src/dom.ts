// DOM helpers the page's views share.

/** A list item holding `text`. */
export function listItem(text: string): HTMLLIElement {
  const li = document.createElement("li");
  li.textContent = text;
  return li;
}

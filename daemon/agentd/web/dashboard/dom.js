// Building the page's elements: text is always set as text (never parsed as HTML), so
// whatever an event or a task carries shows as written.

/** `h("button", {type: "button", onclick: f}, "Cancel")`: an element with attributes,
 *  listeners (`on…` keys) and children (strings become text nodes; null is skipped). */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else if (key === "className") element.className = value;
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
}

/** An SVG element (for the chart). */
export function svg(tag, attributes = {}) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  return element;
}

/** Unix seconds as local date and time, or "—". */
export function when(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return new Date(seconds * 1000).toLocaleString();
}

/** A duration in seconds, short. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${Math.round(seconds / 60)} min`;
}

/** JSON shown as indented text. */
export function pretty(value) {
  return h("pre", { className: "json" }, JSON.stringify(value, null, 2));
}

/** A table: `columns` are [heading, cell(row)] pairs. */
export function table(caption, columns, rows) {
  return h("table", {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, columns.map(([heading]) => h("th", { scope: "col" }, heading)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row)))))));
}

/** A labelled input: `field("Name", {name: "name"})` (its id is made from its name). */
export function field(label, attributes) {
  const id = attributes.id || `field-${attributes.name}`;
  return h("span", { className: "field" }, h("label", { for: id }, label), h("input", { ...attributes, id }));
}

/** A labelled select of `options` ([value, text] pairs). */
export function choice(label, name, options, selected) {
  const id = `field-${name}`;
  return h("span", { className: "field" }, h("label", { for: id }, label),
    h("select", { id, name }, options.map(([value, text]) =>
      h("option", { value, selected: value === selected }, text))));
}

/** A status word as a badge (its colour by class, its text for everyone). */
export function badge(status) {
  return h("span", { className: `badge s-${status}` }, status);
}

// The line at the bottom of the page that says what an action did (a live region, so
// screen readers announce it too).

/** Show a short message. */
export function tell(message) {
  document.getElementById("notice").textContent = message;
}

/** Run an action and tell its outcome: resolves to its result, or undefined when it
 *  failed (the error's message is shown, not thrown). */
export async function act(label, action) {
  try {
    const result = await action();
    tell(label);
    return result ?? true;
  } catch (error) {
    tell(`${label.replace(/^\w/, (c) => c.toLowerCase())}: failed, ${error.message}`);
    return undefined;
  }
}

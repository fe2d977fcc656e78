// Small helpers shared by the example pages: no dependencies, plain fetch and streams.

/** The gateway's base URL from the page's field, without a trailing slash. */
function gatewayUrl() {
  return document.getElementById("gateway").value.trim().replace(/\/+$/, "");
}

/** Show a status line; errors in red. */
function setStatus(text, isError = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

/** The message of gogpt's (OpenAI-shaped) JSON error, or the HTTP status when there is none. */
async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || body.detail || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

/** Mint a token with POST /token, so the key stays out of URLs and logs. */
async function mintToken(id, hour, key) {
  const response = await fetch(`${gatewayUrl()}/token`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ id, hour: Number(hour), key }),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  return (await response.json()).token;
}

/**
 * Read a text/event-stream body, calling onData with each event's data as it arrives.
 * Events may be split across network chunks, so an unfinished one waits for the rest.
 */
async function readEvents(response, onData) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = pending.indexOf("\n\n")) >= 0) {
      const event = pending.slice(0, end);
      pending = pending.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart()).join("\n");
      if (data) onData(data);
    }
  }
}

// What an answer's response.done says about its speed, in words, and the chart of the last answers.

const SVG = "http://www.w3.org/2000/svg";
const TARGET_MS = 100; // the first token within 100 ms of the user's action

// "predecoded" | "preloaded" | "cache" | "cold": what made this answer fast (or not).
export function answerKind(response) {
  const t = response.timings || {};
  if (response.cache === "hit") return "cache";
  if (t.predecoded_tokens > 0) return "predecoded";
  if (t.preloaded) return "preloaded";
  return "cold";
}

function ms(value) {
  return value < 10 ? value.toFixed(1) : Math.round(value).toString();
}

// One line: Enter -> first token as the page saw it, then what the server reports (docs/protocol.md).
export function timingsText(response, shownMs) {
  const t = response.timings || {};
  const usage = response.usage || {};
  const parts = [shownMs === null ? "no tokens" : `first token ${ms(shownMs)} ms after Enter`];
  if (response.cache === "hit") {
    const similarity = response.cache_similarity;
    parts.push(`semantic cache hit${similarity === undefined ? "" : ` (similarity ${similarity.toFixed(3)})`}`);
  } else {
    parts.push(response.cache === "off" ? "cache off" : "cache miss");
  }
  if (t.predecoded_tokens > 0) parts.push(`${t.predecoded_tokens} tokens pre-decoded`);
  if (t.preloaded) parts.push("pre-loaded");
  else if (t.preload_predicted) parts.push("pre-load predicted, not finished");
  const prompt = usage.input_tokens;
  const cached = (usage.input_token_details || {}).cached_tokens;
  if (prompt) parts.push(`${cached || 0} of ${prompt} prompt tokens cached`);
  const route = response.route || t.route;
  if (route) parts.push(`route ${route}${response.degraded || t.degraded ? " (degraded)" : ""}`);
  const spec = t.speculative;
  if (spec && spec.proposed > 0) parts.push(`speculative ${spec.accepted} of ${spec.proposed} accepted`);
  const out = usage.output_tokens;
  const decodeMs = t.decode_ms !== undefined ? t.decode_ms : t.total_ms - t.ttft_ms;
  if (out > 1 && decodeMs > 0) parts.push(`${Math.round(((out - 1) * 1000) / decodeMs)} tokens/s`);
  if (response.status !== "completed") parts.push(response.status);
  return parts.join(" · ");
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

// Bars of the last answers' Enter -> first token (scaled to the slowest, at least the 100 ms target, which is
// drawn as a line), coloured by answerKind; `desc` gets the same in words for screen readers.
export function drawChart(svg, desc, answers) {
  const width = 300;
  const height = 90;
  const top = Math.max(TARGET_MS * 1.2, ...answers.map((a) => a.ms));
  const step = width / Math.max(answers.length, 10);
  const nodes = answers.map((a, i) => {
    const rect = document.createElementNS(SVG, "rect");
    const h = Math.max(1, (a.ms / top) * height);
    rect.setAttribute("x", (i * step + 1).toFixed(1));
    rect.setAttribute("y", (height - h).toFixed(1));
    rect.setAttribute("width", Math.max(1, step - 2).toFixed(1));
    rect.setAttribute("height", h.toFixed(1));
    rect.setAttribute("class", a.kind);
    return rect;
  });
  const y = (height - (TARGET_MS / top) * height).toFixed(1);
  const line = document.createElementNS(SVG, "line");
  for (const [k, v] of Object.entries({ x1: 0, x2: width, y1: y, y2: y, stroke: "#b3261e", "stroke-dasharray": "4 3" })) {
    line.setAttribute(k, v);
  }
  svg.replaceChildren(...nodes, line);
  const last = answers[answers.length - 1];
  desc.textContent = `Last ${answers.length} answers: median ${ms(median(answers.map((a) => a.ms)))} ms, latest ${ms(last.ms)} ms (${last.kind}). The dashed line is 100 ms.`;
}

// The documents panel: add pasted or uploaded text to the tenant's store (POST /v1/documents), show how it was
// chunked (GET /v1/documents/{id}?include=chunks), and open the checked ones for the session (context.open).
import { api } from "./client.js";

const MAX_FILE_BYTES = 4 << 20;

export class Documents {
  constructor({ list, form, text, file, panel, base, key, notice, opened }) {
    Object.assign(this, { list, form, text, file, panel, base, key, notice, opened });
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.add();
    });
  }

  openedIds() {
    return [...this.list.querySelectorAll("input[type=checkbox]:checked")].map((box) => box.value);
  }

  // Lists the tenant's documents; a server without a document store has no /v1/documents: the panel hides.
  async refresh() {
    try {
      const docs = await api(this.base, this.key(), "/v1/documents");
      this.panel.hidden = false;
      const opened = new Set(this.openedIds());
      this.list.replaceChildren(...docs.data.map((doc) => this.item(doc, opened.has(doc.id))));
    } catch (error) {
      if (error.status === 404) this.panel.hidden = true;
      else this.notice(`Documents: ${error.message}`);
    }
  }

  async add() {
    const upload = this.file.files[0];
    if (upload && upload.size > MAX_FILE_BYTES) return this.notice(`${upload.name} is over ${MAX_FILE_BYTES >> 20} MB`);
    const text = upload ? await upload.text() : this.text.value;
    if (!text.trim()) return this.notice("Paste some text or choose a file first.");
    const name = upload ? upload.name : text.trim().split("\n")[0].slice(0, 60);
    try {
      const doc = await api(this.base, this.key(), "/v1/documents", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text, metadata: { name } }),
      });
      this.notice("");
      this.text.value = "";
      this.file.value = "";
      const li = this.item(doc, true);
      this.list.append(li);
      li.querySelector("details").open = true;
      this.opened();
    } catch (error) {
      this.notice(`The document was not added: ${error.message}`);
    }
  }

  item(doc, checked) {
    const li = document.createElement("li");
    li.dataset.documentId = doc.id;
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = doc.id;
    box.checked = checked;
    box.addEventListener("change", () => this.opened());
    const name = (doc.metadata && doc.metadata.name) || doc.id;
    label.append(box, ` ${name} (${doc.chunks} chunk${doc.chunks === 1 ? "" : "s"}, ${doc.bytes} bytes)`);
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "chunks";
    const chunks = document.createElement("ol");
    details.append(summary, chunks);
    details.addEventListener("toggle", () => details.open && !chunks.childElementCount && this.showChunks(doc.id, chunks));
    li.append(label, details);
    return li;
  }

  async showChunks(id, list) {
    try {
      const doc = await api(this.base, this.key(), `/v1/documents/${encodeURIComponent(id)}?include=chunks`);
      list.replaceChildren(
        ...doc.chunk_texts.map((text) => {
          const li = document.createElement("li");
          li.textContent = text;
          return li;
        }),
      );
    } catch (error) {
      this.notice(`Documents: ${error.message}`);
    }
  }
}

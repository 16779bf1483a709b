// The page's "On the line" panel: images sent to a stream (/v1/streams/NAME/images),
// scored against its bank of normal images, and the operator's marks on them.
"use strict";

(() => {
  const nameInput = document.getElementById("stream-name");
  const fileInput = document.getElementById("stream-input");
  const undoButton = document.getElementById("stream-undo");
  const bankInfo = document.getElementById("stream-bank");
  const rows = document.querySelector("#stream-results tbody");
  const undoStack = []; // bank versions before each mark, newest last

  const streamUrl = (path) => `/v1/streams/${encodeURIComponent(nameInput.value)}${path}`;

  function showBank(stream) {
    const bank = stream.bank;
    bankInfo.textContent = `Bank: ${bank.id} (${bank.size} images)` +
      (stream.cold_start_waiting ? `, cold start: ${stream.cold_start_waiting} waiting` : "");
    bankInfo.dataset.bankId = bank.id;
  }

  async function postJson(path, body) {
    const response = await fetch(streamUrl(path), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const payload = await response.json();
    if (!response.ok) throw new Error(payload.detail || response.statusText);
    return payload;
  }

  async function mark(sha256, verdict, row) {
    const payload = await postJson("/marks", { image_sha256: sha256, verdict });
    undoStack.push(payload.audit.bank_before);
    undoButton.disabled = false;
    row.dataset.mark = verdict;
    showBank(payload.stream);
  }

  function addRow(result) {
    const row = document.createElement("tr");
    row.className = "stream-row";
    row.dataset.sha256 = result.sha256;
    row.dataset.score = String(result.score);
    const cells = [result.filename, result.score.toFixed(4), result.verdict || "-",
      `${result.bank_id} (${result.bank_size})`];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    const actions = document.createElement("td");
    for (const verdict of ["normal", "defect"]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = `mark-${verdict}`;
      button.textContent = verdict;
      button.addEventListener("click", () => mark(result.sha256, verdict, row));
      actions.appendChild(button);
    }
    row.appendChild(actions);
    rows.prepend(row);
  }

  async function send(files) {
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    const response = await fetch(streamUrl("/images"), { method: "POST", body: form });
    const payload = await response.json();
    if (!response.ok) throw new Error(payload.detail || response.statusText);
    payload.results.forEach(addRow);
    showBank(payload.stream);
  }

  fileInput.addEventListener("change", () => {
    send([...fileInput.files]).finally(() => { fileInput.value = ""; });
  });
  undoButton.addEventListener("click", async () => {
    const version = undoStack.pop();
    if (version === undefined) return;
    const payload = await postJson("/undo", { bank_id: version });
    showBank(payload.stream);
    undoButton.disabled = undoStack.length === 0;
  });
})();

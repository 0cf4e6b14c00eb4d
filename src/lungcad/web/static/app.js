// Drag and drop onto the upload form's drop zone; everything works without script as a plain file picker.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("files");
  const list = document.getElementById("dz-list");
  if (!zone || !input) return;
  const show = () => {
    const names = Array.from(input.files).map((f) => f.name);
    list.textContent = names.length ? names.length + " file(s): " + names.join(", ") : "";
  };
  ["dragenter", "dragover"].forEach((ev) => zone.addEventListener(ev, (e) => {
    e.preventDefault();
    zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((ev) => zone.addEventListener(ev, (e) => {
    e.preventDefault();
    zone.classList.remove("over");
  }));
  zone.addEventListener("drop", (e) => {
    if (e.dataTransfer && e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      show();
    }
  });
  input.addEventListener("change", show);
  const form = document.getElementById("upload-form");
  const button = document.getElementById("upload-button");
  form.addEventListener("submit", () => {
    button.disabled = true;
    button.textContent = "Analysing…";
  });
});

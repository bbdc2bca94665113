// Keyboard shortcuts for the labeling page: A / B / T (tie) / X (both bad) / S (skip) submit,
// R moves to the reason box, Esc leaves it. The buttons work without this script too.
(function () {
  "use strict";
  var form = document.getElementById("vote-form");
  if (!form) { return; }
  var reason = document.getElementById("reason");
  var submitted = false;

  function buttonFor(key) {
    return form.querySelector('button[data-key="' + key + '"]');
  }

  // one submit per page: a second key press or click while the first is in flight does nothing
  form.addEventListener("submit", function (event) {
    if (submitted) { event.preventDefault(); return; }
    submitted = true;
    window.setTimeout(function () {
      form.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
    }, 0);
  });

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var typing = event.target === reason || event.target.tagName === "INPUT";
    if (typing) {
      if (event.key === "Escape") { event.target.blur(); event.preventDefault(); }
      return;
    }
    var key = event.key.toLowerCase();
    if (key === "r") { reason.focus(); event.preventDefault(); return; }
    var button = buttonFor(key);
    if (button) {
      event.preventDefault();
      form.requestSubmit(button);
    }
  });
})();

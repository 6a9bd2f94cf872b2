/* Claw: the little the pages need beyond htmx.
 *
 * The page socket (#live, htmx ws extension) resumes from the highest seq the page shows:
 * on every (re)connect it sends {"type": "resume", "after": SEQ}; data-seq on #live is
 * raised as fragments carrying data-seq arrive. Forms inside fragments swapped in over the
 * socket get the page's CSRF token (the server renders them without a request).
 */
(function () {
  "use strict";

  function live() {
    return document.getElementById("live");
  }

  function seqOf(el) {
    var n = parseInt((el && el.getAttribute("data-seq")) || "0", 10);
    return isNaN(n) ? 0 : n;
  }

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function fillCsrf(root) {
    var token = csrfToken();
    if (!token) return;
    root.querySelectorAll('form[method="post"], form[method="POST"]').forEach(function (form) {
      if (form.querySelector('input[name="csrfmiddlewaretoken"]')) return;
      var input = document.createElement("input");
      input.type = "hidden";
      input.name = "csrfmiddlewaretoken";
      input.value = token;
      form.prepend(input);
    });
  }

  document.addEventListener("htmx:wsOpen", function (evt) {
    var el = live();
    if (!el || evt.target !== el) return;
    evt.detail.socketWrapper.send(JSON.stringify({ type: "resume", after: seqOf(el) }));
  });

  document.addEventListener("htmx:wsAfterMessage", function (evt) {
    var el = live();
    if (!el || typeof evt.detail.message !== "string") return;
    var message = evt.detail.message;
    if (message.charAt(0) === "{") {
      try {
        var frame = JSON.parse(message);
        if (frame.type === "error") console.warn("live socket:", frame.code, frame.message);
      } catch (e) { /* not JSON after all */ }
      return;
    }
    var best = seqOf(el);
    var re = /data-seq="(\d+)"/g;
    var match;
    while ((match = re.exec(message)) !== null) {
      var n = parseInt(match[1], 10);
      if (n > best) best = n;
    }
    el.setAttribute("data-seq", String(best));
    fillCsrf(document);
  });

  document.addEventListener("htmx:wsClose", function (evt) {
    var el = live();
    if (!el || evt.target !== el) return;
    var code = evt.detail.event && evt.detail.event.code;
    if (code === 4403 || code === 4400) {
      document.body.classList.add("live-off");
      el.setAttribute("data-closed", String(code));
    }
  });

  // Copy fields (tokens, invite links) select themselves on click.
  document.addEventListener("click", function (evt) {
    if (evt.target.matches && evt.target.matches("input.copy")) evt.target.select();
  });
})();

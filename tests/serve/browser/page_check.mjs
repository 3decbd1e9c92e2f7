// Drives the system Chromium through the `umbrella serve` page and reports what it saw as JSON.
//
//   node page_check.mjs URL OUT_DIR [UPLOAD_NIFTI]
//
// Steps: load the page; open the first subject of the evaluation table; screenshot the viewer
// canvas (OUT_DIR/canvas.png); ask the question typed into the chat; toggle the model-input
// overlay; upload UPLOAD_NIFTI through the file picker (if given); screenshot the page
// (OUT_DIR/page.png). Prints one JSON object on stdout. Exits 1 on any step that fails.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, outDir, uploadPath] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               // WebGL2 without a GPU: Chromium's software rasteriser (SwiftShader)
               "--use-angle=swiftshader", "--enable-unsafe-swiftshader"];
const profile = mkdtempSync(join(tmpdir(), "umbrella-chromium-"));
const report = { console_errors: [], steps: [] };
const step = (name) => report.steps.push(name);

const context = await chromium.launchPersistentContext(profile, {
  executablePath, headless: true, args: FLAGS, viewport: { width: 1280, height: 1000 },
});
try {
  const page = context.pages()[0] || await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") report.console_errors.push(m.text()); });
  page.on("pageerror", (e) => report.console_errors.push(String(e)));
  page.setDefaultTimeout(60000);

  await page.goto(url);
  await page.waitForSelector("body[data-ready='1']");
  step("page ready");
  report.tasks_text = await page.locator("#tasks").innerText();

  const row = page.locator("#eval-table tbody tr").first();
  report.eval_rows = await page.locator("#eval-table tbody tr").count();
  report.opened_record = await row.getAttribute("data-id");
  await row.click();
  await page.waitForSelector("body[data-scan-loaded]");
  await page.waitForFunction(() => document.getElementById("scan-name").textContent.includes("images/")
                             || document.getElementById("scan-name").textContent.includes(".nii"));
  await page.waitForTimeout(1500);  // NiiVue draws after the volumes load
  report.scan_name = await page.locator("#scan-name").innerText();
  await page.locator("#viewer").screenshot({ path: join(outDir, "canvas.png") });
  step("subject opened");

  const question = await page.locator("#question").inputValue();
  report.question = question;
  await page.click("#ask");
  await page.waitForSelector(".msg.answer");
  const answer = page.locator(".msg.answer").first();
  report.answer = await answer.locator(".a").innerText();
  report.bars = await answer.locator(".bar").count();
  report.bar_texts = await answer.locator(".bar").allInnerTexts();
  step("question answered");

  await page.fill("#question", "Is there a tumor in this scan?");
  await page.click("#ask");
  await page.waitForFunction(() => document.querySelectorAll(".msg.answer").length >= 2);
  report.off_task_notice = await page.locator(".msg.answer .notice").first().innerText();
  step("off-task question answered");

  await page.check("#show-input");
  await page.waitForTimeout(500);
  await page.locator("#viewer").screenshot({ path: join(outDir, "canvas_input.png") });
  await page.uncheck("#show-input");
  step("model input shown");

  if (uploadPath) {
    const before = await page.evaluate(() => document.body.dataset.scanLoaded);
    await page.setInputFiles("#file", uploadPath);
    await page.waitForFunction((b) => document.body.dataset.scanLoaded !== b, before);
    report.uploaded_name = await page.locator("#scan-name").innerText();
    step("file uploaded");
  }
  await page.waitForTimeout(500);
  await page.screenshot({ path: join(outDir, "page.png"), fullPage: true });
  step("page screenshot");
} catch (err) {
  report.error = String(err);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(report));
process.exit(report.error ? 1 : 0);
